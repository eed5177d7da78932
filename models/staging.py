"""Staging directories: private scratch dirs under one root (the registry's ``<home>/tmp``), each guarded by an
flock its owner holds for the dir's whole life, and the sweep that removes the ones whose owner died.

Layout: ``<root>/<token>/`` beside ``<root>/<token>.lock``, with token ``<pid>-<uuid4 hex>``. The owner creates
and locks the lock file before making the dir and unlinks it after removing the dir, so:

* a dir whose lock is held belongs to a live writer (in any process) and is never swept;
* a dir whose lock is free, or which has no lock file, was left by a writer that died (kill -9 runs no cleanup):
  `sweep` removes it, and the lock file with it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models import locks
from models.files import ensure_dir

LOCK_SUFFIX = ".lock"


@contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A new private dir under `root`, locked for its whole life; removed on exit unless renamed away first."""
    ensure_dir(root)
    fd, token = _new_lock(root)
    stage = root / token
    try:
        stage.mkdir()
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        (root / f"{token}{LOCK_SUFFIX}").unlink(missing_ok=True)
        locks.release(fd)


def sweep(root: Path) -> None:
    """Remove the staging leftovers of dead owners under `root`; live owners' dirs stay (their lock is held)."""
    if not root.is_dir():
        return
    tokens = {p.name.removesuffix(LOCK_SUFFIX) for p in root.iterdir()}
    for token in sorted(tokens):
        _sweep_token(root, token)


def _new_lock(root: Path) -> tuple[int, str]:
    """Create and lock ``<token>.lock`` under a fresh token; retry if a sweeper removed it before we locked it."""
    while True:
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        fd = locks.create_locked(root / f"{token}{LOCK_SUFFIX}")
        if fd is not None:
            return fd, token


def _sweep_token(root: Path, token: str) -> None:
    """Remove one staging dir and its lock file, but only while holding that lock (so its owner is gone)."""
    lock_path = root / f"{token}{LOCK_SUFFIX}"
    try:
        fd = locks.try_lock(lock_path, create=False)
    except FileNotFoundError:
        # Owners create the lock before the dir and unlink it after, so a lock-less dir is a leftover.
        shutil.rmtree(root / token, ignore_errors=True)
        return
    if fd is None:
        return
    try:
        shutil.rmtree(root / token, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
    finally:
        locks.release(fd)
