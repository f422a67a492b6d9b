"""Advisory file locks that name their holder (generate.py's shards: two processes never write one shard)."""
import contextlib
import fcntl
import os
import socket


class LockFile:
    """An advisory lock (flock) on the file `path`, which names its holder ("pid 123 on host x") and is removed
    on release. The kernel drops the lock when its process dies, so the file a killed run leaves blocks nobody."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def acquire(self, wait=False):
        """True once this process holds the lock; False if another process holds it (unless `wait`)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # the umask applies, as in open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as err:  # a file system without locks (some network mounts)
                os.close(fd)
                raise OSError(err.errno, f"cannot be locked ({err.strerror})", self.path) from None
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)  # its holder removed the file after this process opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return True

    def holder(self):
        """Who holds the lock, as the holder wrote it."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(200).strip() or "another process"
        except OSError:
            return "another process"

    def release(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking: a process that opened the file meanwhile sees it is gone
        os.close(self.fd)
        self.fd = None
