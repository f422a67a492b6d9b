"""Writes that leave a whole file or none, and the checks that run before anything is written.

Every file a stage writes (images, shards, indexes, checkpoints, results, logs) goes through here: a process killed
at any moment leaves the old file or the new one, never a partial one (temporary names start with '.tmp', which
readers skip); files get the mode `open` would give them; a full disk or quota is one line (`cli.UserError`), not a
traceback; a symlink planted where an output goes is replaced, never written through.
"""
import contextlib
import errno
import json
import os
import shutil
import tempfile

from util.cli import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota exceeded, file-size limit


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
        full = no_space_error(err, path)
        if full:
            raise full from None
        raise


def no_space(err):
    """The errno of a full disk, quota or file-size limit behind `err` (torch.save wraps it in a RuntimeError
    that names only the message), else 0."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            return cause.errno
    text = str(err)
    return next((code for code in NO_SPACE if os.strerror(code) in text), 0)


def no_space_error(err, path):
    """The one-line UserError for `err` when a full disk, quota or file-size limit is behind it (naming `path`),
    else None."""
    code = no_space(err)
    if not code:
        return None
    return UserError(f"no space left to write {path} ({os.strerror(code)}); free some space and rerun the same "
                     "command")


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


@contextlib.contextmanager
def output_folder(path, scratch=()):
    """The output folder, created (with its missing parents) and proven writable for the block. If the block fails,
    what it created is removed again when nothing but `scratch` is in it (names of caches the block may have
    written, e.g. an index it built before the run failed on its data): a run that fails before writing its own
    files leaves nothing behind. A folder that existed before is left as it is."""
    created, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        check_writable_folder(path)
        yield
    except BaseException:
        if created and os.path.isdir(path) and set(os.listdir(path)) <= set(scratch):
            for name in os.listdir(path):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        for folder in created:  # the deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
