"""The inputs of recent predictions (``<home>/inputs.db``), so ``POST /feedback {"id": ..., "label": ...}`` can
label a prediction without the client sending the image again.

Each input is kept for ``ttl_s`` seconds (at most ``max_items`` of them). Expired inputs leave a small tombstone
row, so a late feedback gets "expired" rather than "unknown". Written off the request path by the serving worker
(service/background.OffPath); one fresh SQLite connection per operation (WAL, synchronous=NORMAL: the cache is
disposable, a process crash keeps it, power loss may not), safe across threads and forked workers.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from models import settings
from models.sqlite import connect, init_db, transaction
from pipelines.label_images import DEFAULT_MAX_SHORT_SIDE, encode_png, prepare_image
from service.decode import DecodeLimits, open_image

INPUTS_DB = "inputs.db"


class UnknownPredictionError(LookupError):
    """Feedback names a prediction id this service never recorded (or forgot long ago)."""

    status_code = 404


class ExpiredPredictionError(LookupError):
    """Feedback names a prediction whose input is no longer kept."""

    status_code = 410


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    return connect(path, timeout, durable=False)


@contextmanager
def _write(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a fresh connection: all of it or none of it."""
    with closing(_connect(path, timeout)) as conn, transaction(conn):
        yield conn


_INPUTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    prediction_id TEXT PRIMARY KEY,
    adapter TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    png BLOB,
    dropped TEXT CHECK (dropped IS NULL OR dropped IN ('ttl', 'capacity'))
);
CREATE INDEX IF NOT EXISTS inputs_live ON inputs (created_at) WHERE png IS NOT NULL;
CREATE INDEX IF NOT EXISTS inputs_dropped ON inputs (created_at) WHERE png IS NULL;
CREATE TABLE IF NOT EXISTS counts (kind TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO counts (kind, n) VALUES ('live', 0), ('dead', 0)
"""


def _bump(conn: sqlite3.Connection, live: int = 0, dead: int = 0) -> None:
    conn.execute("UPDATE counts SET n = n + ? WHERE kind = 'live'", (live,))
    conn.execute("UPDATE counts SET n = n + ? WHERE kind = 'dead'", (dead,))


def _counts(conn: sqlite3.Connection) -> tuple[int, int]:
    rows = dict(conn.execute("SELECT kind, n FROM counts").fetchall())
    return rows["live"], rows["dead"]


class InputCache:
    """The inputs of recent predictions, so feedback can name a prediction id instead of re-sending the image.

    Bounded two ways: an input is dropped `ttl_s` seconds after its prediction, and only the newest `max_items`
    are kept. A dropped input leaves a tombstone (id, adapter, version, time; no pixels) so that feedback for it
    gets a clear "expired"; tombstones are bounded too (`max_tombstones`, default 10 x max_items), beyond which
    an id is simply unknown. Survives restarts (it is a file under `home`).
    """

    def __init__(
        self,
        home: str | Path,
        ttl_s: float = settings.default("feedback_ttl_s"),
        max_items: int = settings.default("feedback_max_items"),
        max_short_side: int | None = DEFAULT_MAX_SHORT_SIDE,
        max_tombstones: int | None = None,
        timeout_s: float = 10.0,
        max_encoded_bytes: int = 512 * 1024,
    ) -> None:
        if ttl_s <= 0 or max_items < 1:
            raise ValueError(f"ttl_s must be > 0 and max_items >= 1, got {ttl_s} and {max_items}")
        self.path = Path(home).expanduser().absolute() / INPUTS_DB
        self.ttl_s = float(ttl_s)
        self.max_items = int(max_items)
        self.max_short_side = max_short_side
        self.max_tombstones = 10 * self.max_items if max_tombstones is None else int(max_tombstones)
        self._timeout = timeout_s
        self.max_encoded_bytes = max_encoded_bytes
        init_db(self.path, _INPUTS_SCHEMA, timeout_s, durable=False)

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
            (pid, adapter, int(version), now, self._blob(im, raw))
            for pid, im, raw in zip(prediction_ids, images, blobs, strict=True)
        ]
        with _write(self.path, self._timeout) as conn:
            cur = conn.executemany(
                "INSERT OR IGNORE INTO inputs (prediction_id, adapter, version, created_at, png) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            inserted = max(cur.rowcount, 0)
            _bump(conn, live=inserted)
            self._prune(conn, now)
        return inserted

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Drop expired inputs, then the oldest beyond max_items, then the oldest tombstones beyond max_tombstones.

        Row counts live in the `counts` table, kept in the same transactions, so this costs index range scans over
        the rows it changes, not a COUNT(*) over up to max_tombstones rows on every request."""
        dropped = conn.execute(
            "UPDATE inputs SET png = NULL, dropped = 'ttl' WHERE png IS NOT NULL AND created_at < ?",
            (now - self.ttl_s,),
        ).rowcount
        _bump(conn, live=-dropped, dead=dropped)
        live, dead = _counts(conn)
        if live > self.max_items:
            dropped = conn.execute(
                "UPDATE inputs SET png = NULL, dropped = 'capacity' WHERE rowid IN (SELECT rowid FROM inputs "
                "WHERE png IS NOT NULL ORDER BY created_at, rowid LIMIT ?)",
                (live - self.max_items,),
            ).rowcount
            _bump(conn, live=-dropped, dead=dropped)
            dead += dropped
        if dead > self.max_tombstones:
            deleted = conn.execute(
                "DELETE FROM inputs WHERE rowid IN (SELECT rowid FROM inputs WHERE png IS NULL "
                "ORDER BY created_at, rowid LIMIT ?)",
                (dead - self.max_tombstones,),
            ).rowcount
            _bump(conn, dead=-deleted)

    def prune(self, now: float | None = None) -> None:
        """Apply the bounds now (they are applied on every put_many too)."""
        with _write(self.path, self._timeout) as conn:
            self._prune(conn, time.time() if now is None else now)

    def __len__(self) -> int:
        """Inputs kept now (expired ones not yet pruned included)."""
        with closing(_connect(self.path, self._timeout)) as conn:
            return _counts(conn)[0]

    def get(self, prediction_id: str, now: float | None = None) -> tuple[str, int, Image.Image]:
        """(adapter, version, image) of a recent prediction; UnknownPredictionError / ExpiredPredictionError."""
        with closing(_connect(self.path, self._timeout)) as conn:
            row = conn.execute(
                "SELECT adapter, version, created_at, png, dropped FROM inputs WHERE prediction_id = ?",
                (prediction_id,),
            ).fetchone()
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
