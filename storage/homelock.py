"""One process at a time writes a data directory: the home lock.

`HomeLock` holds an exclusive `flock` on `<home>/benchsync.lock` for as long as
it is held (a running node holds it for its whole life; an offline command
that writes holds it while its dataset is open). The kernel drops the lock
when the process dies, even by `kill -9`, so a stale file never blocks a
restart. The file holds the owner's pid, for the error a second process gets.

Holding the lock also means no other instance is working in the home, so
whatever scratch files are there are leftovers of a crash: `LocalDataset`
removes them right after taking it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from benchsync.storage.errors import StorageError

LOCK_FILENAME = "benchsync.lock"


class HomeInUse(StorageError):
    """Another process (a running node, or a command writing offline) holds the home."""

    def __init__(self, home: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"{home} is already used by a running node ({who})")
        self.home = home
        self.pid = pid


class HomeLock:
    """An exclusive lock on one data directory. `acquire()` it; `release()` (or exit) drops it."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.path = self.home / LOCK_FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting. Raises `HomeInUse` naming the holder's pid."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HomeInUse(self.home, _read_pid(self.path)) from None
            raise StorageError(f"cannot lock {self.path}: {e.strerror or e}") from None
        # Ours now: record who holds it (read by the next process that is refused).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent). The pid stays in the file; only the flock counts."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None
