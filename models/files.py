"""Durable files: sha256, fsync, atomic writes and atomic directories. The one copy every store and artifact uses.

A write is durable once the file and the directory that names it are fsynced; an atomic write goes to a
temporary sibling and is renamed over the target, so a reader (or a restart after kill -9) sees the old bytes or
the new ones, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 1 << 20  # hashing and copying read 1 MiB at a time: flat memory for multi-GB weights


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: str | Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by POSIX relative path (sorted)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def fsync_dir(path: str | Path) -> None:
    """A rename or create is only durable once the containing directory is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root, deepest first, then root itself."""
    root = Path(root)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)  # os.open(O_RDONLY) + fsync works for regular files and directories alike
    fsync_dir(root)


def ensure_dir(path: str | Path) -> None:
    """mkdir -p that fsyncs each parent it had to create a child in, so new directories survive power loss."""
    path = Path(path)
    if path.is_dir():
        return
    ensure_dir(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


def write_durable(path: str | Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write and fsync a file in place (a new file in a private staging directory needs no rename)."""
    with open(path, "xb" if exclusive else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp sibling, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def copy_tree_durable(src: str | Path, dst: str | Path) -> None:
    """Copy regular files (following symlinks) into dst, fsyncing each and every directory: durable before a rename.

    Refuses to overwrite: every target file is created exclusively."""
    src, dst = Path(src), Path(dst)
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif item.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(item, "rb") as fi, open(target, "xb") as fo:
                shutil.copyfileobj(fi, fo, CHUNK)
                fo.flush()
                os.fsync(fo.fileno())
    for d in sorted((p for p in dst.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(dst)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to `target`; on success fsync it and rename it to `target` (replacing it).

    On any exception the temp dir is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
