"""Advisory file locks (flock): the one implementation behind the runner lock, the drift-check leader, staging
directories and the Evidently workspace.

flock locks belong to an open file description: the kernel drops them when the holder closes the descriptor or
dies (kill -9 included), so a crashed holder never leaves a stale lock behind. They are advisory: they bind only
processes that take them, and need a local or POSIX-locking filesystem.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another process holds the lock (for a non-blocking or bounded wait)."""


def try_lock(path: str | Path, *, create: bool = True, mode: int = 0o644) -> int | None:
    """Open `path` and take its exclusive lock without waiting; the descriptor (the lock) or None when it is held.

    Release with `release(fd)`. With create=False a missing file is FileNotFoundError."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_locked(path: str | Path, mode: int = 0o600) -> int | None:
    """Create `path` exclusively and take its exclusive lock: the descriptor, or None when the file was unlinked
    (or replaced) before the lock was ours. FileExistsError when `path` already exists.

    For lock files that a sweeper removes once their lock is free: between our create and our flock a sweeper may
    open, lock and unlink the new file, and our lock would then guard a file nobody else can find. Comparing the
    inode `path` names with the one we locked catches that; the caller retries under a fresh name."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a sweeper holds it, for the microseconds of its probe
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def acquire(path: str | Path, wait_s: float | None = None, poll_s: float = 0.05) -> int:
    """The exclusive lock on `path` (created if missing): block until free, or raise LockHeldError after wait_s."""
    if wait_s is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd
    deadline = time.monotonic() + wait_s
    while (fd := try_lock(path)) is None:
        if time.monotonic() >= deadline:
            raise LockHeldError(f"{path} is locked by another process")
        time.sleep(poll_s)
    return fd


def release(fd: int) -> None:
    """Drop a lock taken by try_lock/acquire (closing the descriptor releases the flock)."""
    os.close(fd)


def is_locked(path: str | Path) -> bool:
    """True while some process holds `path`'s exclusive lock: a shared-lock probe held for microseconds."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def locked(path: str | Path, wait_s: float | None = None, thread_lock: threading.Lock | None = None) -> Iterator[int]:
    """Hold the exclusive lock on `path` for the block (blocking, or LockHeldError after wait_s).

    flock does not exclude threads of one process that open the file separately from each other reliably across
    platforms; pass `thread_lock` to serialise them too."""
    if thread_lock is not None:
        thread_lock.acquire()
    try:
        fd = acquire(path, wait_s)
        try:
            yield fd
        finally:
            release(fd)
    finally:
        if thread_lock is not None:
            thread_lock.release()
