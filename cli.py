"""What every stage script shares at its edges: one-line errors for bad input, atomic file writes, and (for the
scripts that chain stages: demo.py, experiments/) running a stage script as a user would.

A user error (a missing folder, a bad flag value, a checkpoint of the wrong model) ends the script with one line
on stderr and exit code 2, never a traceback: the stage raises `UserError`, and `run(main, parser)` turns it
into that line.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

REPOSITORY = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2."""


def run(main, parser, argv=None):
    """Parse the command line and call `main(args)`; a UserError becomes `error: <message>` and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


def atomic_write_bytes(path, data):
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    A process killed at any moment (SIGKILL included) leaves either the old file or the new one, never a
    partial file; the temporary names start with '.tmp' so readers can ignore leftovers.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def check_writable_folder(path):
    """Create `path` if needed and prove a file can be written there; UserError otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"output folder {path} cannot be written ({err.strerror or err})") from None


def run_stage(title, *command):
    """`python <command>` from the repository root, offline, echoing the command as a user would type it; a
    failure becomes a UserError naming the command (the stage has already printed its own message)."""
    line = " ".join(shlex.quote(part) for part in command)
    print(f"\n==> {title}\n$ python {line}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if subprocess.run([sys.executable, *command], cwd=REPOSITORY, env=env).returncode != 0:
        raise UserError(f"stage '{title}' failed (command: python {line})")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
