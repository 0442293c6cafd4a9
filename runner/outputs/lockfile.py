"""The lock files of the state file, the output folder and a SQLite database: `flock` on a
file beside them, which the kernel releases when the holder dies. The file is never
deleted: deleting it would let two runs lock two different files of one name."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from runner.errors import LockedError, UsageError


def lock_file(path: str, held: str, cannot_open: str | None = None) -> int:
    """Lock `path` (made if missing) without waiting; returns the descriptor to unlock.

    LockedError (exit 75) names what another run holds (`held`); UsageError (exit 2) when
    the file cannot be opened (`cannot_open`, or a message naming the file) or locked.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        text = (
            f"{cannot_open}: {reason}"
            if cannot_open
            else f"cannot open the lock file {path}: {reason}"
        )
        raise UsageError(text) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockedError(f"another run {held} (lock {path})") from exc
        raise UsageError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    return fd


def unlock_file(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
