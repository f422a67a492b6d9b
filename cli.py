"""What every stage script shares at its edges: one-line errors for bad input, range-checked flags and recipe files,
atomic file writes, lazy imports of the heavy libraries.

A user error (a missing folder, a bad flag value, a checkpoint of the wrong model) ends the script with one line
on stderr and exit code 2, never a traceback: the stage raises `UserError`, and `run(main, parser)` turns it
into that line.
"""
import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile

REPOSITORY = os.path.dirname(os.path.abspath(__file__))
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota exceeded, file-size limit


class UserError(Exception):
    """Bad input from the user (or a full disk): reported as one line and exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """The stage scripts' parser: argparse, plus recipe files. `python pretrain.py @recipes/cc12m_vitb_1x.args`
    reads flags from the file, any number on a line, `#` starting a comment; flags after it override it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, fromfile_prefix_chars="@", **kwargs)

    def convert_arg_line_to_args(self, line):
        return shlex.split(line, comments=True)


def run(main, parser, argv=None):
    """Parse the command line and call `main(args)`. A bad flag (argparse's own check or a range check of the
    flag's `type`) and a UserError both end the script with `prog: error: <message>`, one line, exit code 2.
    `args.flags_given` lists the flags the command line set itself (a resumed run takes the others from its
    checkpoint)."""
    def fail(message):
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = fail  # argparse would print its usage block first; one line says more
    args = parser.parse_args(argv)
    args.flags_given = sorted(explicit_flags(parser, argv))
    try:
        return main(args)
    except UserError as err:
        fail(err)


# ---- range-checked argparse types: a bad number stops at parse time, before anything is read or written ----

def _bounds(minimum, maximum, above=None, below=None):
    """'>= 1 and <= 100' for the messages."""
    def show(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    low = [f"> {show(above)}"] if above is not None else [f">= {show(minimum)}"] if minimum is not None else []
    high = [f"< {show(below)}"] if below is not None else [f"<= {show(maximum)}"] if maximum is not None else []
    return " and ".join(low + high)


def integer(minimum=None, maximum=None):
    """An argparse `type`: an integer in [minimum, maximum] (either bound optional)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, maximum)}, got {text}")
        return value
    return parse


def number(minimum=None, maximum=None, above=None, below=None):
    """An argparse `type`: a finite float (never nan or inf), >= minimum or > above, <= maximum or < below."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = (minimum is not None and value < minimum) or (above is not None and value <= above)
        too_high = (maximum is not None and value > maximum) or (below is not None and value >= below)
        if not math.isfinite(value) or too_low or too_high:
            bounds = _bounds(minimum, maximum, above, below)
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}, got {text}")
        return value
    return parse


SEED = integer(0, 2 ** 63 - 1)  # what torch.manual_seed and numpy accept


def explicit_flags(parser, argv=None):
    """The destinations the command line sets itself, as opposed to those left at their defaults (a resumed run
    takes the rest from its checkpoint)."""
    quiet = ArgumentParser(add_help=False)
    for action in parser._actions:  # the same flags, every default suppressed
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            quiet._add_action(_without_default(action))
    known, _ = quiet.parse_known_args(sys.argv[1:] if argv is None else argv)
    return set(vars(known))


def _without_default(action):
    clone = argparse.Action.__new__(type(action))
    clone.__dict__.update(action.__dict__, default=argparse.SUPPRESS, required=False)
    return clone


class lazy_import:
    """A stand-in for the module `name` that imports it at the first use of one of its attributes.

    The stage scripts reach torch, torchvision, diffusers and our torch-based modules through these, so that
    `--help` and a bad flag answer at once (importing torch alone takes 2 s); the first real use pays the
    import. Unlike importlib's LazyLoader, nothing is put in sys.modules before the real import, so code that
    walks sys.modules (inspect does, inside torch's own import) never sets off an import halfway through another.
    """

    def __init__(self, name):
        self._name, self._module = name, None

    def __getattr__(self, attribute):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self):
        return f"<lazy module {self._name!r}{' (imported)' if self._module is not None else ''}>"


# ---- files ----

def _umask():
    """The process's umask, read once at import (os.umask can only be read by setting it, which is not
    thread-safe later on)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


@contextlib.contextmanager
def atomic_open(path):
    """A binary file that becomes `path` when the block ends without error: written under an unpredictable
    temporary name in the same folder (created exclusively, so a planted symlink is never followed), then
    renamed over `path` (which replaces a link there, never writes through it).

    A process killed at any moment (SIGKILL included) leaves either the old file or the new one, never a
    partial one; the temporary names start with '.tmp' so readers can ignore leftovers. The file gets the mode
    `open` would give it (0666 less the umask), so lab-mates can read what a run writes. A full disk (or quota,
    or file-size limit) removes the temporary file and becomes a UserError naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if no_space(err):
            raise UserError(f"no space left to write {path} ({os.strerror(no_space(err))}); free some space and "
                            "rerun the same command") from None
        raise


def no_space(err):
    """The errno of a full disk, quota or file-size limit behind `err` (torch.save wraps it in a RuntimeError
    that names only the message), else 0."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            return cause.errno
    text = str(err)
    return next((code for code in NO_SPACE if os.strerror(code) in text), 0)


def atomic_write_bytes(path, data):
    """Write `data` to `path` through `atomic_open`."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def open_append(path):
    """Open a text file for appending (a log), refusing to follow a symlink at `path`: UserError if one is there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; refusing to write through it") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def check_creatable(path, what="output folder"):
    """Is `path` a writable folder, or one that could be created (its nearest existing ancestor is a writable
    folder)? Creates nothing, so a run that then fails on its input leaves nothing behind. UserError otherwise."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be written ({probe} is not a writable folder)")


def check_writable_folder(path):
    """Create `path` if needed and prove a file can be written there; UserError otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"output folder {path} cannot be written ({err.strerror or err})") from None


def hub_reachable(timeout=3.0):
    """Does the Hugging Face hub answer a TCP connection within `timeout` seconds? (Offline, huggingface_hub
    retries every file for minutes before it gives up.)"""
    import socket
    from urllib.parse import urlparse
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def git_commit():
    """The git commit of this code, or None outside a git checkout (recorded in every run's settings)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
