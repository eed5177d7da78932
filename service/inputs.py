"""The inputs of recent predictions, in the state database, so ``POST /feedback {"id": ..., "label": ...}`` can
label a prediction without the client sending the image again, through any replica: with a server database
(ADAPTSERVE_DATABASE_URL) every replica finds the inputs of the one that served the prediction.

Each input is kept for ``ttl_s`` seconds (at most ``max_items`` of them). Expired inputs leave a small tombstone
row, so a late feedback gets "expired" rather than "unknown". Written off the request path by the serving worker
(service/background.OffPath), non-durably (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off: the cache
is disposable, a process crash keeps it, power loss may not); every writer queues on INPUTS_LOCK, so the row
counts stay exact. A home's legacy inputs.db is imported on the first open, then renamed inputs.db.imported.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    text,
    update,
)

from models import settings
from models.db import Database, metadata, redact
from models.legacy import IMPORTED_SUFFIX, open_legacy, retire
from models.state import open_state
from pipelines.label_images import DEFAULT_MAX_SHORT_SIDE, encode_png, prepare_image
from service.decode import DecodeLimits, open_image

log = logging.getLogger("adaptserve")

INPUTS_LOCK = "feedback_inputs"
LEGACY_FILE = "inputs.db"
_LIVE, _DEAD = text("png IS NOT NULL"), text("png IS NULL")  # partial indexes: each prune scans only its kind

feedback_inputs = Table(
    "feedback_inputs", metadata,
    Column("seq", Integer, primary_key=True),  # insertion order: the tie-break among inputs of one request
    Column("prediction_id", Text, nullable=False, unique=True),
    Column("adapter", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("png", LargeBinary),  # NULL: a tombstone
    Column("dropped", Text),  # why the pixels went: ttl | capacity
    CheckConstraint("dropped IS NULL OR dropped IN ('ttl', 'capacity')", name="dropped"),
    Index("ix_feedback_inputs_live", "created_at", sqlite_where=_LIVE, postgresql_where=_LIVE),
    Index("ix_feedback_inputs_dropped", "created_at", sqlite_where=_DEAD, postgresql_where=_DEAD),
)  # fmt: skip

# Rows "live" and "dead" (seeded by the revision): how many inputs and tombstones there are, kept in the same
# transactions as feedback_inputs, so a prune costs index range scans, not a COUNT(*) on every request
feedback_input_counts = Table(
    "feedback_input_counts", metadata,
    Column("kind", Text, primary_key=True),
    Column("n", Integer, nullable=False),
)  # fmt: skip


class UnknownPredictionError(LookupError):
    """Feedback names a prediction id this service never recorded (or forgot long ago)."""

    status_code = 404


class ExpiredPredictionError(LookupError):
    """Feedback names a prediction whose input is no longer kept."""

    status_code = 410


def _bump(conn: Connection, live: int = 0, dead: int = 0) -> None:
    n = feedback_input_counts.c.n
    for kind, delta in (("live", live), ("dead", dead)):
        if delta:
            conn.execute(update(feedback_input_counts).where(feedback_input_counts.c.kind == kind).values(n=n + delta))


def _counts(conn: Connection) -> tuple[int, int]:
    rows = dict(conn.execute(select(feedback_input_counts.c.kind, feedback_input_counts.c.n)).all())
    return rows["live"], rows["dead"]


class InputCache:
    """The inputs of recent predictions, so feedback can name a prediction id instead of re-sending the image.

    Bounded two ways: an input is dropped `ttl_s` seconds after its prediction, and only the newest `max_items`
    are kept. A dropped input leaves a tombstone (id, adapter, version, time; no pixels) so that feedback for it
    gets a clear "expired"; tombstones are bounded too (`max_tombstones`, default 10 x max_items), beyond which
    an id is simply unknown. Survives restarts (it is in the state database, shared by every home on its URL).
    """

    def __init__(
        self,
        home: str | Path,
        ttl_s: float = settings.default("feedback_ttl_s"),
        max_items: int = settings.default("feedback_max_items"),
        max_short_side: int | None = DEFAULT_MAX_SHORT_SIDE,
        max_tombstones: int | None = None,
        max_encoded_bytes: int = 512 * 1024,
    ) -> None:
        if ttl_s <= 0 or max_items < 1:
            raise ValueError(f"ttl_s must be > 0 and max_items >= 1, got {ttl_s} and {max_items}")
        self.home = Path(home).expanduser().absolute()
        self.ttl_s = float(ttl_s)
        self.max_items = int(max_items)
        self.max_short_side = max_short_side
        self.max_tombstones = 10 * self.max_items if max_tombstones is None else int(max_tombstones)
        self.max_encoded_bytes = max_encoded_bytes
        self._settings = settings.load()
        import_legacy(self.database, self.home)

    @property
    def database(self) -> Database:
        """The state database, through this process's engine (a forked worker gets its own: engines do not fork)."""
        return open_state(self.home, self._settings)

    @classmethod
    def from_env(cls, home: str | Path, **kwargs: Any) -> InputCache:
        """ttl_s and max_items from the settings feedback_ttl_s and feedback_max_items (ADAPTSERVE_FEEDBACK_*)."""
        s = settings.load()
        kwargs.setdefault("ttl_s", s.feedback_ttl_s)
        kwargs.setdefault("max_items", s.feedback_max_items)
        return cls(home, **kwargs)

    def put_many(
        self,
        adapter: str,
        version: int,
        prediction_ids: Sequence[str],
        images: Sequence[Image.Image],
        now: float | None = None,
        encoded: Sequence[bytes | None] | None = None,
    ) -> int:
        """Keep the inputs of one request's predictions; returns how many were new (a known id is ignored).

        `encoded`: the bytes each image was decoded from (as the client sent them). Up to `max_encoded_bytes` they
        are stored as they are, costing nothing; otherwise the image is stored as a PNG of its shrunk copy (5-8 ms
        at 224-256 px, compress_level 1: a third of a 2-core server's CPU per image in `adaptserve bench serve`).
        get() gives the same pixels either way. One short transaction; meant to run off the request path."""
        if len(prediction_ids) != len(images) or (encoded is not None and len(encoded) != len(images)):
            raise ValueError(f"got {len(prediction_ids)} prediction ids and {len(images)} images; pass one id each")
        now = time.time() if now is None else now
        blobs = encoded if encoded is not None else [None] * len(images)
        rows = [
            {"prediction_id": pid, "adapter": adapter, "version": int(version), "created_at": now,
             "png": self._blob(im, raw)}
            for pid, im, raw in zip(prediction_ids, images, blobs, strict=True)
        ]  # fmt: skip
        with self.database.write(lock=INPUTS_LOCK, durable=False) as conn:
            fresh = _new_rows(conn, rows)
            if fresh:
                conn.execute(insert(feedback_inputs), fresh)
            _bump(conn, live=len(fresh))
            self._prune(conn, now)
        return len(fresh)

    def _prune(self, conn: Connection, now: float) -> None:
        """Drop expired inputs, then the oldest beyond max_items, then the oldest tombstones beyond max_tombstones.

        Row counts live in feedback_input_counts, kept in the same transactions, so this costs index range scans over
        the rows it changes, not a COUNT(*) over up to max_tombstones rows on every request."""
        t = feedback_inputs.c
        dropped = conn.execute(update(feedback_inputs).where(t.png.isnot(None), t.created_at < now - self.ttl_s)
                               .values(png=None, dropped="ttl")).rowcount
        _bump(conn, live=-dropped, dead=dropped)
        live, dead = _counts(conn)
        if live > self.max_items:
            oldest = _oldest(t.png.isnot(None), live - self.max_items)
            dropped = conn.execute(update(feedback_inputs).where(t.seq.in_(oldest))
                                   .values(png=None, dropped="capacity")).rowcount
            _bump(conn, live=-dropped, dead=dropped)
            dead += dropped
        if dead > self.max_tombstones:
            oldest = _oldest(t.png.is_(None), dead - self.max_tombstones)
            deleted = conn.execute(delete(feedback_inputs).where(t.seq.in_(oldest))).rowcount
            _bump(conn, dead=-deleted)

    def prune(self, now: float | None = None) -> None:
        """Apply the bounds now (they are applied on every put_many too)."""
        with self.database.write(lock=INPUTS_LOCK, durable=False) as conn:
            self._prune(conn, time.time() if now is None else now)

    def __len__(self) -> int:
        """Inputs kept now (expired ones not yet pruned included)."""
        with self.database.read() as conn:
            return _counts(conn)[0]

    def get(self, prediction_id: str, now: float | None = None) -> tuple[str, int, Image.Image]:
        """(adapter, version, image) of a recent prediction; UnknownPredictionError / ExpiredPredictionError."""
        t = feedback_inputs.c
        with self.database.read() as conn:
            row = conn.execute(select(t.adapter, t.version, t.created_at, t.png, t.dropped)
                               .where(t.prediction_id == prediction_id)).first()
        if row is None:
            raise UnknownPredictionError(
                f"unknown prediction id {prediction_id!r}: this service made no such prediction "
                f"(or made it too long ago to remember); send the image with the label instead"
            )
        adapter, version, created_at, png, dropped = row
        age = (time.time() if now is None else now) - created_at
        if dropped == "capacity":
            raise ExpiredPredictionError(
                f"prediction id {prediction_id!r} expired: only the newest {self.max_items} inputs are kept "
                "(ADAPTSERVE_FEEDBACK_MAX_ITEMS); send the image with the label instead"
            )
        if png is None or age > self.ttl_s:
            raise ExpiredPredictionError(
                f"prediction id {prediction_id!r} expired: inputs are kept for {self.ttl_s:g} s "
                "(ADAPTSERVE_FEEDBACK_TTL_S); "
                "send the image with the label instead"
            )
        return adapter, int(version), self._image(png)

    def _blob(self, image: Image.Image, raw: bytes | None) -> bytes:
        if raw is not None and len(raw) <= self.max_encoded_bytes:
            return bytes(raw)
        return encode_png(prepare_image(image, self.max_short_side), compress_level=1)

    def _image(self, blob: bytes) -> Image.Image:
        """What put_many stored, decoded as the service decodes a request (EXIF orientation, first frame, RGB), then
        shrunk as put_many shrinks before its PNG encode: one image for one input, however it was stored."""
        limits = DecodeLimits(max_pixels=2**40, max_image_bytes=max(len(blob), 1))  # it was accepted when it came in
        return prepare_image(open_image(blob, limits), self.max_short_side)


def _new_rows(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose prediction id is neither stored nor earlier in `rows` (a retried id is ignored)."""
    ids = [r["prediction_id"] for r in rows]
    known = set(conn.scalars(select(feedback_inputs.c.prediction_id).where(feedback_inputs.c.prediction_id.in_(ids))))
    fresh = []
    for row in rows:
        if row["prediction_id"] not in known:
            known.add(row["prediction_id"])
            fresh.append(row)
    return fresh


def _oldest(kind: Any, n: int) -> Any:
    """The seq of the `n` oldest rows of one kind (live or tombstone): by time, then insertion order."""
    t = feedback_inputs.c
    return select(t.seq).where(kind).order_by(t.created_at, t.seq).limit(n)


# ------------------------------------------------------------------------------------------------ legacy import


def import_legacy(database: Database, home: Path) -> None:
    """Copy `<home>/inputs.db` (the SQLite file the cache kept before the state database) into `database` once, in
    one write transaction, and rename it inputs.db.imported; a no-op (one stat) when the home has none.

    Rows whose prediction id is already there are skipped (a process killed between the commit and the rename, two
    processes opening at once), and the counts are recomputed from the table, so they stay exact either way."""
    path = home / LEGACY_FILE
    if not path.is_file():
        return
    with database.write(lock=INPUTS_LOCK, durable=False) as conn:
        if not path.is_file():  # another process imported it while this one waited for the lock
            return
        with closing(open_legacy(path)) as old:
            copied = _copy_legacy(conn, old)
    retire(path)
    log.info("imported %d feedback input(s) from %s into %s; the file is now %s%s", copied, path,
             redact(database.url), path.name, IMPORTED_SUFFIX)


def _copy_legacy(conn: Connection, old: sqlite3.Connection) -> int:
    """The old inputs (tombstones too) in their old order, then the live and dead counts of the whole table."""
    columns = ("prediction_id", "adapter", "version", "created_at", "png", "dropped")
    copied = 0
    cursor = old.execute(f"SELECT {', '.join(columns)} FROM inputs ORDER BY rowid")
    while batch := cursor.fetchmany(500):  # bounded memory: each row may hold a PNG
        fresh = _new_rows(conn, [dict(zip(columns, row, strict=True)) for row in batch])
        if fresh:
            conn.execute(insert(feedback_inputs), fresh)
        copied += len(fresh)
    t = feedback_inputs.c
    live, dead = (conn.execute(select(func.count()).where(kind)).scalar_one() for kind in (t.png.isnot(None),
                                                                                            t.png.is_(None)))
    for kind, n in (("live", live), ("dead", dead)):
        conn.execute(update(feedback_input_counts).where(feedback_input_counts.c.kind == kind).values(n=n))
    return copied
