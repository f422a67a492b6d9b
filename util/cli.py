"""What every stage script shares at its edges: one-line errors for bad input, range-checked flags and recipe files,
the command line read before the heavy imports (atomic file writes are files.py's).

A user error (a missing folder, a bad flag value, a checkpoint of the wrong model) ends the script with one line
on stderr and exit code 2, never a traceback: the stage raises `UserError`, and `run(main, parser)` turns it
into that line.
"""
import argparse
import math
import os
import shlex
import subprocess
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, above util/


class UserError(Exception):
    """Bad input from the user (or a full disk): reported as one line and exit code 2."""


def first_line(err):
    """An exception's message for a one-line error: its first line, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def raised_message(err):
    """The message `err` was raised with, also when a DataLoader worker raised it: the main process then gets the
    same type with the worker's traceback as its text, which ends in `<module>.<Type>: <message>`."""
    last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    return last.removeprefix(f"{type(err).__module__}.{type(err).__qualname__}: ")


class ArgumentParser(argparse.ArgumentParser):
    """The stage scripts' parser: argparse, plus recipe files. `python pretrain.py @recipes/cc12m_vitb_1x.args`
    reads flags from the file, any number on a line, `#` starting a comment; flags after it override it, and a
    file may name other files (`@other.args`). A recipe file is part of the command line, as a shell script is:
    whatever it says is run as if typed (`--data pipe:COMMAND` included), so read one before running it.

    A file that names itself (directly or through others), that is not UTF-8 text, or whose quotes do not close,
    and a NUL byte in any argument, end the script with one line (`error`), as a bad flag does."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(arg) for arg in args]
        return super().parse_known_args(self._expand_files(argv, ()), namespace)

    def _expand_files(self, argv, including):
        """argv with every `@file` replaced by the flags in it; `including` holds the files being read."""
        expanded = []
        for arg in argv:
            if "\0" in arg:
                shown = arg.replace("\0", "\\0")[:80]
                self.error(f"an argument holds a NUL byte ({shown!r}): no path or value can contain one")
            if not arg.startswith("@") or len(arg) == 1:
                expanded.append(arg)
                continue
            path = arg[1:]
            if os.path.realpath(path) in including:
                self.error(f"{arg}: the recipe file includes itself")
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
                flags = [flag for line in lines for flag in shlex.split(line, comments=True)]
            except OSError as err:
                self.error(f"{arg}: cannot read {path} ({err.strerror})")
            except UnicodeDecodeError:
                self.error(f"{arg}: {path} is not a text file of flags (its bytes are not UTF-8)")
            except ValueError as err:  # shlex: an unclosed quote
                self.error(f"{arg}: {path} cannot be read as flags ({err})")
            expanded += self._expand_files(flags, including + (os.path.realpath(path),))
        return expanded


def parse_command_line(parser, argv=None):
    """The parsed command line (sys.argv's, or `argv`). A bad flag (argparse's own check or a range check of the
    flag's `type`) ends the script with `prog: error: <message>`, one line, exit code 2. `args.flags_given` lists
    the flags the command line set itself (a resumed run takes the others from its checkpoint).

    The stage scripts call it before their heavy imports (torch takes 2 s), so that --help and a bad flag answer
    at once; `run` then calls main."""
    parser.error = lambda message: _fail(parser.prog, message)  # argparse would print its usage block first
    args = parser.parse_args(argv)
    args.flags_given = sorted(explicit_flags(parser, argv))
    return args


def run(main, parser, argv=None, args=None):
    """Call `main(args)` on the parsed command line (`args`, or parse_command_line(parser, argv)). A UserError ends
    the script as a bad flag does: `prog: error: <message>`, one line, exit code 2."""
    if args is None:
        args = parse_command_line(parser, argv)
    try:
        return main(args)
    except UserError as err:
        _fail(parser.prog, err)


def _fail(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def available_cpus():
    """The CPU cores this process may run on (its affinity: what a cluster job was given), for default worker
    counts that never exceed the machine (more loader workers than cores makes torch warn, and only adds switching)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
