"""Files derived from a model (its ONNX export, its int8 file and report), built once for every replica sharing a
state database and an artifact store, and fetched, verified, by all the others.

A derived build is named by a key that spells out everything its bytes depend on, e.g. the base's ONNX export
`onnx:<model id>:<sha256 of its weights>:base:<input size>:<exporter>` and its int8 file
`int8:<sha256 of the fp32 file>:<calibration recipe>`, so a different model, or the same one through another exporter,
never meets a stale file. One build may write several files (int8: the model and its report); `derived_files` holds
one row per file (key, name, digest, size, built_by, created_at), all rows of a key inserted in one transaction.

`DerivedFiles.get_or_build(key, build, dest)`:
- The rows exist: each file is fetched from the artifact store and verified (a corrupt object is an ArtifactError
  and never reaches dest; so is a missing one, which means this replica does not share the builder's store), unless
  dest already holds exactly those bytes: dest is the replica's local cache, hashed again on every use.
- Else one process anywhere builds. It wins the key's lease (`derived_leases`: key, holder, until) in a short
  write, renews it from a thread while it builds into a temporary directory beside dest, stores every file
  (`put_file` verifies the upload), then inserts the rows and drops the lease in one transaction. The others poll
  for the rows every poll_s, for at most wait_s (then DerivedBusy, naming the builder). No transaction stays open
  during a build: on SQLite that would stop every writer of the database for as long.
- A build that raises leaves no row (a failure is never cached as a success) and gives the lease back: the next
  caller builds again. A builder killed mid-build leaves its lease, which runs out lease_s after its last renewal;
  then the next caller builds.
- A builder that lost its lease (stalled past lease_s while another took over) still publishes: both builds are
  valid bytes for the key, the rows inserted first stand, and everyone, that builder included, serves those.

Times are the replicas' wall clocks (epoch seconds): their skew must stay well under lease_s. Build one DerivedFiles
per process (its database engine does not survive a fork).
`LocalBuilds` is the same interface with nothing shared: an engine with no state directory (benchmarks, unit tests)
builds into dest when a file is missing, as every replica did before.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import BigInteger, Column, Connection, Float, String, Table, Text, delete, insert, select, update

from models import settings
from models.artifact_store import ArtifactError, ArtifactStore, artifacts_url, open_store
from models.db import Database, metadata
from models.files import ensure_dir, file_sha256, fsync_dir
from models.state import open_state

log = logging.getLogger("adaptserve")

DERIVED_LOCK = "derived_files"  # the write lock (models.db) of both tables: every write to them is one short step
FILE = "file"  # the name of the one file of a single-file build (get_or_build)

Build = Callable[[Path], None]  # writes each named file into the directory it is given

derived_files = Table(
    "derived_files", metadata,
    Column("key", Text, primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("digest", String(64), nullable=False),  # sha256: the object's key in the artifact store
    Column("size", BigInteger, nullable=False),
    Column("built_by", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

derived_leases = Table(
    "derived_leases", metadata,
    Column("key", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("until", Float, nullable=False),
)

TABLES = (derived_files, derived_leases)
_F, _L = derived_files, derived_leases


class DerivedError(RuntimeError):
    """A derived build did not produce what its caller asked for."""


class DerivedBusy(DerivedError):
    """Another process kept building a key for longer than this one may wait."""


@dataclass(frozen=True)
class DerivedFile:
    """One stored file of a derived build."""

    key: str
    name: str
    digest: str
    size: int
    built_by: str
    created_at: float


@dataclass(frozen=True)
class Lease:
    holder: str
    until: float


def new_holder() -> str:
    """Who builds: host and pid say which process, the random part tells two DerivedFiles of one process apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Builds(ABC):
    """Where an engine gets its derived files: shared (DerivedFiles) or built in place (LocalBuilds)."""

    def get_or_build(self, key: str, build: Callable[[Path], None], dest: Path) -> Path:
        """The one file of `key` at `dest`; `build(path)` writes it at `path` when nobody has yet."""
        return self.get_or_build_files(key, lambda tmp: build(tmp / FILE), {FILE: Path(dest)})[FILE]

    @abstractmethod
    def get_or_build_files(self, key: str, build: Build, dests: Mapping[str, Path]) -> dict[str, Path]:
        """Every file of `key` at its dest ({name: path}); `build(directory)` writes each name into `directory`."""


class LocalBuilds(Builds):
    """Nothing shared: builds into dest when a file is missing, and trusts a file that is there."""

    def get_or_build_files(self, key: str, build: Build, dests: Mapping[str, Path]) -> dict[str, Path]:
        paths = _checked(key, dests)
        if not all(path.is_file() for path in paths.values()):
            with _build_dir(paths) as tmp:
                _run(key, build, tmp, paths)
                for name, dest in paths.items():
                    _place(tmp / name, dest)
        return paths


class DerivedFiles(Builds):
    """Derived files shared through `database` and `store`; see the module docstring.

    lease_s: how long a builder's lease lasts without renewal (it renews every third of it), so how long a killed
    builder holds the others back; wait_s: how long a caller waits for another's build before DerivedBusy;
    poll_s: how often a waiting caller looks for the rows.
    """

    def __init__(self, database: Database, store: ArtifactStore, *, holder: str | None = None, lease_s: float = 60.0,
                 wait_s: float = 900.0, poll_s: float = 0.5) -> None:
        for name, value in (("lease_s", lease_s), ("wait_s", wait_s), ("poll_s", poll_s)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.database, self.store = database, store
        self.holder = holder or new_holder()
        self.lease_s, self.wait_s, self.poll_s = float(lease_s), float(wait_s), float(poll_s)

    @classmethod
    def for_home(cls, home: str | Path, config: settings.Settings | None = None, **kwargs: float) -> DerivedFiles:
        """The state database of `home` (ADAPTSERVE_DATABASE_URL when set) and the artifact store
        (ADAPTSERVE_ARTIFACTS_URL, else `<home>/artifacts`); no digest cache of the store's: the callers' dests are
        this replica's copies, a second cache would double the disk."""
        config = config or settings.load()
        store = open_store(artifacts_url(config.model_copy(update={"home": Path(home)})))
        return cls(open_state(home, config), store, **kwargs)

    def __repr__(self) -> str:
        return f"DerivedFiles({self.database!r}, {self.store!r})"

    # ---------------------------------------------------------------------------------------------------- reads

    def rows(self, key: str) -> dict[str, DerivedFile]:
        """The stored files of `key` by name; empty while nobody has built it."""
        return self._state(key)[0]

    def lease(self, key: str) -> Lease | None:
        """Who builds `key` now (or last held its lease and died); None when nobody does."""
        return self._state(key)[1]

    def _state(self, key: str) -> tuple[dict[str, DerivedFile], Lease | None]:
        with self.database.read() as conn:
            rows = {r.name: DerivedFile(**r._mapping) for r in conn.execute(select(_F).where(_F.c.key == key))}
            lease = conn.execute(select(_L.c.holder, _L.c.until).where(_L.c.key == key)).first()
        return rows, None if lease is None else Lease(lease.holder, lease.until)

    # ------------------------------------------------------------------------------------------------ get/build

    def get_or_build_files(self, key: str, build: Build, dests: Mapping[str, Path]) -> dict[str, Path]:
        paths = _checked(key, dests)
        holder = f"{self.holder}/{uuid.uuid4().hex[:6]}"  # per call: two threads of one process are two builders
        deadline = time.monotonic() + self.wait_s
        while True:
            rows, lease = self._state(key)
            if paths.keys() <= rows.keys():
                return self._fetch(rows, paths)
            if (lease is None or lease.until <= time.time()) and self._acquire(key, holder):
                try:
                    rows = self.rows(key)  # published between our read and our lease
                    if paths.keys() <= rows.keys():
                        return self._fetch(rows, paths)
                    return self._build(key, build, paths, holder)
                finally:
                    self._release(key, holder)
            if time.monotonic() >= deadline:
                who = "another process" if lease is None else lease.holder
                raise DerivedBusy(f"derived files of {key!r}: still being built by {who} after {self.wait_s:g} s "
                                  "of waiting; not built here (try again later)")
            time.sleep(self.poll_s)

    def _fetch(self, rows: Mapping[str, DerivedFile], paths: dict[str, Path]) -> dict[str, Path]:
        """Each dest holding its row's bytes: kept when it already does, else fetched (verified) from the store."""
        for name, dest in paths.items():
            row = rows[name]
            if dest.is_file() and file_sha256(dest) == row.digest:
                continue
            if not self.store.exists(row.digest):
                raise ArtifactError(f"derived file {name!r} of {row.key!r} was built by {row.built_by}, but "
                                    f"{self.store} has no object sha256:{row.digest}: replicas that share a state "
                                    f"database must share its artifact store too (set "
                                    f"{settings.env_name('artifacts_url')} on each)")
            self.store.get_file(row.digest, dest)  # ArtifactError when the stored object is corrupt
        return paths

    def _build(self, key: str, build: Build, paths: dict[str, Path], holder: str) -> dict[str, Path]:
        start = time.perf_counter()
        log.info("building derived files of %s (%s)", key, holder)
        with _build_dir(paths) as tmp, self._renewing(key, holder):
            _run(key, build, tmp, paths)
            built = {name: (self.store.put_file(tmp / name), (tmp / name).stat().st_size) for name in paths}
            self._publish(key, built, holder)
            rows = self.rows(key)
            for name, dest in paths.items():
                if rows[name].digest == built[name][0]:
                    _place(tmp / name, dest)
                else:  # our lease ran out and another build was published first: serve what stands
                    self.store.get_file(rows[name].digest, dest)
        log.info("built derived files of %s in %.1f s", key, time.perf_counter() - start)
        return paths

    # ---------------------------------------------------------------------------------------------------- lease

    def _acquire(self, key: str, holder: str) -> bool:
        """Win the key's lease when nobody holds it or its holder stopped renewing it."""
        now = time.time()

        def work(conn: Connection) -> bool:  # every writer of these tables holds DERIVED_LOCK: read-then-write is safe
            current = conn.execute(select(_L.c.until).where(_L.c.key == key)).first()
            if current is None:
                conn.execute(insert(_L).values(key=key, holder=holder, until=now + self.lease_s))
                return True
            if current.until > now:
                return False
            conn.execute(update(_L).where(_L.c.key == key).values(holder=holder, until=now + self.lease_s))
            return True

        return self.database.transact(work, lock=DERIVED_LOCK, durable=False)

    def _renew(self, key: str, holder: str) -> bool:
        def work(conn: Connection) -> bool:
            renewed = conn.execute(update(_L).where(_L.c.key == key, _L.c.holder == holder)
                                   .values(until=time.time() + self.lease_s))
            return renewed.rowcount == 1

        return self.database.transact(work, lock=DERIVED_LOCK, durable=False)

    def _release(self, key: str, holder: str) -> None:
        def work(conn: Connection) -> None:
            conn.execute(delete(_L).where(_L.c.key == key, _L.c.holder == holder))

        self.database.transact(work, lock=DERIVED_LOCK, durable=False)

    def _publish(self, key: str, built: Mapping[str, tuple[str, int]], holder: str) -> None:
        """The rows of the files just stored (those nobody published first) and the end of the lease, in one step."""
        now = time.time()

        def work(conn: Connection) -> None:
            have = set(conn.scalars(select(_F.c.name).where(_F.c.key == key)))
            new = [{"key": key, "name": name, "digest": digest, "size": size, "built_by": holder, "created_at": now}
                   for name, (digest, size) in built.items() if name not in have]
            if new:
                conn.execute(insert(_F), new)
            conn.execute(delete(_L).where(_L.c.key == key, _L.c.holder == holder))

        self.database.transact(work, lock=DERIVED_LOCK)

    @contextmanager
    def _renewing(self, key: str, holder: str) -> Iterator[None]:
        """Renew the lease every third of lease_s from a thread until the block ends: a build in C++ (the ONNX
        exporter, the quantizer) may hold this thread for minutes, and two renewals may fail before it runs out."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    if not self._renew(key, holder):
                        log.warning("derived files of %s: the lease of %s ran out; another process may build too",
                                    key, holder)
                        return
                except Exception:  # the database is unreachable: keep trying while the lease may still hold
                    log.exception("derived files of %s: renewing the lease failed", key)

        thread = threading.Thread(target=renew, name="derived-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def _checked(key: str, dests: Mapping[str, Path]) -> dict[str, Path]:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"a derived key must be a non-empty string, got {key!r}")
    if not dests:
        raise ValueError(f"derived files of {key!r}: no file named")
    for name in dests:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"derived file name {name!r} is not a plain file name")
    return {name: Path(dest) for name, dest in dests.items()}


@contextmanager
def _build_dir(paths: Mapping[str, Path]) -> Iterator[Path]:
    """A temporary directory beside the first dest (one filesystem: the built files are renamed into place), named
    by host and pid so that the next build removes what a builder of this host killed mid-build left there."""
    parent = next(iter(paths.values())).parent
    ensure_dir(parent)
    host = socket.gethostname()
    for stale in parent.glob(f".derived-{host}-*-*"):
        pid = stale.name[len(f".derived-{host}-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".derived-{host}-{os.getpid()}-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _run(key: str, build: Build, tmp: Path, paths: Mapping[str, Path]) -> None:
    build(tmp)
    missing = [name for name in paths if not (tmp / name).is_file()]
    if missing:
        raise DerivedError(f"the build of {key!r} wrote no {', '.join(missing)}")


def _place(src: Path, dest: Path) -> None:
    ensure_dir(dest.parent)
    shutil.move(src, dest)  # a rename on one filesystem: a reader sees the old file or the whole new one
    fsync_dir(dest.parent)
