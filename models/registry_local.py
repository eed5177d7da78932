"""Each home's local copies of the registry's versions: ``<home>/adapters/<name>/<version>/``, what loaders read.

The registry's truth is the state database (rows, manifests) plus the artifact store (objects by sha256). A local
copy is a cache of one version, made in one of two ways:

* `adopt`: the staging dir a register() of this home filled, hashed and uploaded becomes the copy (a rename, no
  download), after the version's row committed;
* `ensure`: a version this home never had is fetched with `ArtifactStore.get_tree`, which verifies every file
  against the manifest's sha256 and renames the finished dir into place, so the path holds all of it or nothing.

Both run under a per-name flock (``<home>/adapters/.locks/<name>.lock``, never removed), so two processes of one
home never build the same copy at once, and nothing is made or replaced under a reader: once a copy's dir exists
it is never rewritten, only re-hashed by `Registry.verify` (a damaged copy stays damaged and is refused; removing
the dir makes the next verify fetch it again from the store).

`sweep` (at open) removes what no row explains: copies of versions deleted since (by any home), a killed
delete's half-removed dir, a killed fetch's temporary dir. It lists the dirs before it reads the rows: a copy is
only made after its row committed, so a dir listed before the read whose row the read misses was deleted.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from models import locks
from models.artifact_store import ArtifactError, ArtifactStore, Manifest
from models.files import ensure_dir, fsync_dir
from models.registry_errors import UnfetchableAdapterError

log = logging.getLogger("adaptserve.registry")

LOCKS_DIR = ".locks"
_LEFTOVER = re.compile(r"^\.\d+\.(tmp|old)-")  # models.files.atomic_dir's temporary names for a version dir
_thread_locks: dict[Path, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    """One lock per lock file per process: flock alone is not guaranteed to exclude threads on every platform."""
    with _thread_locks_guard:
        return _thread_locks.setdefault(path, threading.Lock())


class LocalCopies:
    """The verified local copies under `root` (``<home>/adapters``), fetched from `store` when missing."""

    def __init__(self, root: Path, store: ArtifactStore) -> None:
        self.root, self.store = root, store

    def path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        ensure_dir(self.root / LOCKS_DIR)
        lock = self.root / LOCKS_DIR / f"{name}.lock"
        with locks.locked(lock, thread_lock=_thread_lock(lock)):
            yield

    def ensure(self, name: str, version: int, manifest: Manifest) -> Path:
        """The version's dir, fetched and verified first when this home has none (UnfetchableAdapterError when the
        store lacks an object or holds a corrupt one: nothing is left at the path then)."""
        dest = self.path(name, version)
        if dest.is_dir():
            return dest
        with self._locked(name):
            if not dest.is_dir():  # another process of this home may have fetched it while we waited
                try:
                    self.store.get_tree(manifest, dest)
                except (ArtifactError, ValueError) as err:  # ValueError: a manifest path or digest out of shape
                    raise UnfetchableAdapterError(name, version, str(err)) from None
                log.info("adapter %s v%s: fetched %d file(s) from %s into %s", name, version, len(manifest),
                         self.store.url, dest)
        return dest

    def adopt(self, stage: Path, name: str, version: int) -> None:
        """Make a staged, fsynced dir the version's copy (a rename); if a copy appeared meanwhile, keep that one."""
        dest = self.path(name, version)
        with self._locked(name):
            if dest.exists():
                return
            ensure_dir(dest.parent)
            stage.rename(dest)
            fsync_dir(dest.parent)

    def remove(self, name: str, version: int) -> None:
        with self._locked(name):
            shutil.rmtree(self.path(name, version), ignore_errors=True)

    def sweep(self, live: Callable[[], set[tuple[str, int]]]) -> None:
        """Remove copies whose version has no row, and dead fetches' temporary dirs; `live()` reads the rows."""
        if not self.root.is_dir():
            return
        listed = {d.name: [v.name for v in d.iterdir()] for d in self.root.iterdir()
                  if d.is_dir() and not d.name.startswith(".")}
        if not listed:
            return
        rows = live()  # after listing: see the module docstring
        for name, entries in listed.items():
            stale = [e for e in entries if e.isdigit() and (name, int(e)) not in rows]
            with self._locked(name):  # a fetch in progress holds it: its temporary dir is not a leftover
                leftovers = [e.name for e in (self.root / name).iterdir() if _LEFTOVER.match(e.name)]
                for entry in stale + leftovers:
                    shutil.rmtree(self.root / name / entry, ignore_errors=True)
            if stale:
                log.info("adapter %s: removed the local copies of deleted versions %s", name, sorted(stale, key=int))
