"""Labelled data for re-fine-tuning: a durable label store, and a short-lived cache of prediction inputs.

`LabelStore` (``<home>/labels.db``) keeps every labelled image of every adapter with where it came from and
when. An example's id is a hash of (adapter, pixels), so the same image labelled twice (a corrected
feedback, a re-upload, a re-import) is one example: the latest label wins, and every labelling stays in the
``events`` log. The train / holdout split hashes that id, so an example never moves between splits while
the holdout fraction stays the same (raising the fraction only moves examples from train to holdout).

`InputCache` (``<home>/inputs.db``) keeps the input of each recent prediction for ``ttl_s`` seconds (at most
``max_items`` of them), so that ``POST /feedback {"id": ..., "label": ...}`` can refer to a prediction.
Expired inputs leave a small tombstone row, so a late feedback gets "expired" rather than "unknown".

Images are stored as PNG bytes after the model's own first step (`to_rgb`) and, when their shorter side is
longer than ``max_short_side`` (default 256), downscaled to it with the resize the model's preprocessing
uses. Every catalog backbone resizes the shorter side to at most 256 px, so the stored image reproduces the
model input exactly (resize_size 256) or to within one further antialiased resize; a 12-megapixel upload
costs ~100 KB instead of ~20 MB. Pass ``max_short_side=None`` to keep the received pixels untouched.

Both stores open a fresh SQLite connection per operation (WAL), like the adapter registry: safe across
threads and across the forked serving workers that share one home.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image

from models.preprocessing import to_rgb
from models.registry import NAME_PATTERN
from models.sqlite import connect, init_db, transaction
from pipelines.data import SPLITS, ImageSet, scan_class_folder

LABELS_DB = "labels.db"
INPUTS_DB = "inputs.db"
TTL_ENV = "ADAPTSERVE_FEEDBACK_TTL_S"
MAX_ITEMS_ENV = "ADAPTSERVE_FEEDBACK_MAX_ITEMS"
DEFAULT_MAX_SHORT_SIDE = 256
_MAX_LISTED = 30


class LabelError(ValueError):
    """A label cannot be stored as given; the message says what would be accepted."""


class UnknownPredictionError(LookupError):
    """Feedback names a prediction id this service never recorded (or forgot long ago)."""


class ExpiredPredictionError(LookupError):
    """Feedback names a prediction whose input is no longer kept."""


# --------------------------------------------------------------------------------------------- helpers


def _durable(path: Path) -> bool:
    # labels are people's work: FULL survives power loss; the input cache is disposable: NORMAL (WAL) survives a
    # process crash, which is enough, and skips an fsync per request
    return path.name == LABELS_DB


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    return connect(path, timeout, durable=_durable(path))


@contextmanager
def _write(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a fresh connection: all of it or none of it."""
    with closing(_connect(path, timeout)) as conn, transaction(conn):
        yield conn


def _init_db(path: Path, schema: str, timeout: float) -> None:
    init_db(path, schema, timeout, durable=_durable(path))


def prepare_image(image: Image.Image, max_short_side: int | None = DEFAULT_MAX_SHORT_SIDE) -> Image.Image:
    """RGB, shorter side at most `max_short_side`, resized as torchvision's Resize(int) would (bilinear,
    antialiased, long side truncated), so the model's own Resize of the result is a no-op."""
    image = to_rgb(image)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if max_short_side is None or short <= max_short_side:
        return image
    new_long = int(max_short_side * long / short)
    size = (max_short_side, new_long) if w <= h else (new_long, max_short_side)
    return image.resize(size, Image.BILINEAR)


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


def example_id(adapter: str, image: Image.Image) -> str:
    """Content id of a labelled example: the same pixels for the same adapter are the same example."""
    h = hashlib.blake2b(digest_size=16, person=b"adaptserve-label")
    h.update(f"{adapter}\0{image.mode}:{image.width}x{image.height}\0".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def holdout_score(label_id: str) -> float:
    """Uniform in [0, 1), fixed per id: an example is in the holdout iff its score < the holdout fraction."""
    digest = hashlib.blake2b(label_id.encode(), digest_size=8, person=b"adaptserve-split").digest()
    return int.from_bytes(digest, "big") / 2**64


def _shorten(items: Sequence[str]) -> str:
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_adapter(adapter: str) -> str:
    import re

    if not isinstance(adapter, str) or not re.fullmatch(NAME_PATTERN, adapter):
        raise LabelError(f"invalid adapter name {adapter!r}: must match {NAME_PATTERN}")
    return adapter


def _check_label(adapter: str, label: object, classes: Sequence[str]) -> str:
    if not isinstance(label, str) or label not in classes:
        raise LabelError(f"unknown label {label!r} for adapter {adapter!r}; valid labels: {_shorten(list(classes))}")
    return label


# --------------------------------------------------------------------------------------------- label store

_LABELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id TEXT PRIMARY KEY,
    adapter TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    prediction_id TEXT,
    split TEXT CHECK (split IS NULL OR split IN ('train', 'holdout')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    png BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_adapter ON labels (adapter, updated_at);
CREATE INDEX IF NOT EXISTS labels_by_prediction ON labels (prediction_id) WHERE prediction_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    label_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    prediction_id TEXT,
    at REAL NOT NULL
)
"""

_UPSERT = (
    "INSERT INTO labels (id, adapter, label, source, prediction_id, split, created_at, updated_at, width, height, png)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET label = excluded.label,"
    " source = excluded.source, prediction_id = COALESCE(excluded.prediction_id, labels.prediction_id),"
    " updated_at = excluded.updated_at"  # split and created_at never change: an example keeps its split
)


@dataclass(frozen=True)
class LabelRecord:
    id: str
    adapter: str
    label: str
    source: str
    prediction_id: str | None
    split: str
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ImportReport:
    """What `LabelStore.import_folder` did: new examples, relabelled known ones, unreadable files skipped."""

    added: int
    updated: int
    skipped: list[str] = field(default_factory=list)
    per_split: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.added + self.updated


class LabelStore:
    """Every labelled image of every adapter, durably, with its source and times (see the module docstring)."""

    def __init__(
        self,
        home: str | Path,
        holdout_fraction: float = 0.3,
        max_short_side: int | None = DEFAULT_MAX_SHORT_SIDE,
        timeout_s: float = 30.0,
    ) -> None:
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be between 0 and 1 (exclusive), got {holdout_fraction}")
        self.path = Path(home).expanduser().absolute() / LABELS_DB
        self.holdout_fraction = holdout_fraction
        self.max_short_side = max_short_side
        self._timeout = timeout_s
        _init_db(self.path, _LABELS_SCHEMA, timeout_s)

    def split_of(self, label_id: str, forced: str | None = None, holdout_fraction: float | None = None) -> str:
        fraction = self.holdout_fraction if holdout_fraction is None else holdout_fraction
        return forced or ("holdout" if holdout_score(label_id) < fraction else "train")

    # ---------------------------------------------------------------- writes

    def _row(
        self, adapter: str, image: Image.Image, label: str, source: str, prediction_id: str | None, split: str | None
    ) -> tuple:
        image = prepare_image(image, self.max_short_side)
        now = time.time()
        return (
            example_id(adapter, image), adapter, label, source, prediction_id, split, now, now,
            image.width, image.height, encode_png(image),
        )  # fmt: skip

    def _insert(self, conn: sqlite3.Connection, rows: Sequence[tuple]) -> tuple[int, int]:
        """Upsert rows and log one event each; (new examples, relabelled ones)."""
        added = 0
        for row in rows:
            known = conn.execute("SELECT 1 FROM labels WHERE id = ?", (row[0],)).fetchone() is not None
            conn.execute(_UPSERT, row)
            conn.execute(
                "INSERT INTO events (label_id, adapter, label, source, prediction_id, at) VALUES (?, ?, ?, ?, ?, ?)",
                row[:5] + (row[7],),
            )
            added += not known
        return added, len(rows) - added

    def add(
        self,
        adapter: str,
        image: Image.Image,
        label: str,
        classes: Sequence[str],
        source: str,
        prediction_id: str | None = None,
    ) -> str:
        """Store one labelled image; returns its label id.

        Labelling an image already stored for this adapter (the same prediction again, or the same pixels from
        another route) replaces its label: the latest label wins, the id and split stay, both labellings stay
        in the event log. An unknown label raises LabelError listing the valid ones.
        """
        _check_adapter(adapter)
        _check_label(adapter, label, classes)
        if not source:
            raise LabelError("source must say where the label came from, e.g. 'feedback', 'upload', 'import:<dir>'")
        row = self._row(adapter, image, label, source, prediction_id, None)
        with _write(self.path, self._timeout) as conn:
            self._insert(conn, [row])
        return row[0]

    def import_folder(self, adapter: str, folder: str | Path, classes: Sequence[str]) -> ImportReport:
        """Import an ImageFolder: ``folder/<class>/<image>`` (split by hashing, like feedback), or
        ``folder/{train,val,test}/<class>/<image>`` where train stays train and val/test go to the holdout.

        Every class folder must be one of `classes` (checked before anything is stored); unreadable files are
        skipped and listed; the whole import is one transaction."""
        _check_adapter(adapter)
        folder = Path(folder).expanduser().absolute()
        parts = [s for s in SPLITS if (folder / s).is_dir()] or [""]
        sets = {part: scan_class_folder(folder / part) for part in parts}  # DataError (a ValueError) if unusable
        unknown = sorted({c for s in sets.values() for c in s.classes} - set(classes))
        if unknown:
            raise LabelError(
                f"class folder(s) {', '.join(unknown)} under {folder} are not labels of adapter {adapter!r}; "
                f"valid labels: {_shorten(list(classes))}"
            )
        rows, report = [], ImportReport(0, 0)
        for part, images in sets.items():
            forced = {"": None, "train": "train"}.get(part, "holdout")
            source = f"import:{folder / part}" if part else f"import:{folder}"
            for image, k in zip(images.images, images.labels, strict=True):
                rows.append(self._row(adapter, image, images.classes[k], source, None, forced))
            report.skipped += images.skipped
            report.per_split[part or "all"] = len(images)
        with _write(self.path, self._timeout) as conn:
            report.added, report.updated = self._insert(conn, rows)
        return report

    # ---------------------------------------------------------------- reads

    def get(self, label_id: str) -> LabelRecord:
        with closing(_connect(self.path, self._timeout)) as conn:
            row = conn.execute(
                "SELECT id, adapter, label, source, prediction_id, split, created_at, updated_at FROM labels "
                "WHERE id = ?",
                (label_id,),
            ).fetchone()
        if row is None:
            raise KeyError(f"no label with id {label_id!r}")
        return LabelRecord(*row[:5], self.split_of(row[0], row[5]), *row[6:])

    def count(self, adapter: str, since: float | None = None) -> int:
        """Examples of `adapter`; with `since` (unix time) only those labelled or relabelled since then."""
        with closing(_connect(self.path, self._timeout)) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM labels WHERE adapter = ? AND updated_at >= ?", (adapter, since or 0.0)
            ).fetchone()[0]

    def history(self, label_id: str) -> list[dict[str, Any]]:
        """Every labelling of one example, oldest first (the audit trail of relabels)."""
        with closing(_connect(self.path, self._timeout)) as conn:
            rows = conn.execute(
                "SELECT label, source, prediction_id, at FROM events WHERE label_id = ? ORDER BY seq", (label_id,)
            ).fetchall()
        return [dict(zip(("label", "source", "prediction_id", "at"), r, strict=True)) for r in rows]

    def summary(self, adapter: str) -> dict[str, Any]:
        """Counts per label, per split and per source kind, and the time span of the labels."""
        with closing(_connect(self.path, self._timeout)) as conn:
            rows = conn.execute(
                "SELECT id, label, source, split, updated_at FROM labels WHERE adapter = ?", (adapter,)
            ).fetchall()
        splits = Counter(self.split_of(r[0], r[3]) for r in rows)
        return {
            "adapter": adapter,
            "labels": len(rows),
            "train": splits["train"],
            "holdout": splits["holdout"],
            "holdout_fraction": self.holdout_fraction,
            "per_label": dict(sorted(Counter(r[1] for r in rows).items())),
            "per_source": dict(sorted(Counter(r[2].split(":", 1)[0] for r in rows).items())),
            "first_at": min((r[4] for r in rows), default=None),
            "last_at": max((r[4] for r in rows), default=None),
        }

    def dataset(
        self,
        adapter: str,
        classes: Sequence[str],
        holdout_fraction: float | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> tuple[ImageSet, ImageSet]:
        """(train, holdout) ImageSets of `adapter`'s labels, newest `limit` (all by default) labelled since
        `since`. Examples whose label is no longer one of `classes` are left out and listed in `.skipped`."""
        sql = "SELECT id, label, split, png FROM labels WHERE adapter = ? AND updated_at >= ? ORDER BY updated_at DESC"
        with closing(_connect(self.path, self._timeout)) as conn:
            rows = conn.execute(f"{sql} LIMIT ?", (adapter, since or 0.0, -1 if limit is None else limit)).fetchall()
        index = {c: i for i, c in enumerate(classes)}
        parts: dict[str, ImageSet] = {s: ImageSet([], [], list(classes)) for s in ("train", "holdout")}
        skipped: list[str] = []
        for label_id, label, forced, png in sorted(rows):  # id order: independent of labelling order
            if label not in index:
                skipped.append(f"{label_id} (label {label!r})")
                continue
            part = parts[self.split_of(label_id, forced, holdout_fraction)]
            part.images.append(decode_png(png))
            part.labels.append(index[label])
        parts["train"].skipped = skipped
        return parts["train"], parts["holdout"]


# --------------------------------------------------------------------------------------------- input cache

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
        ttl_s: float = 3600.0,
        max_items: int = 20000,
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
        _init_db(self.path, _INPUTS_SCHEMA, timeout_s)

    @classmethod
    def from_env(cls, home: str | Path, **kwargs: Any) -> InputCache:
        """ttl_s from $ADAPTSERVE_FEEDBACK_TTL_S and max_items from $ADAPTSERVE_FEEDBACK_MAX_ITEMS when set."""
        if os.environ.get(TTL_ENV):
            kwargs.setdefault("ttl_s", float(os.environ[TTL_ENV]))
        if os.environ.get(MAX_ITEMS_ENV):
            kwargs.setdefault("max_items", int(os.environ[MAX_ITEMS_ENV]))
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
                f"({MAX_ITEMS_ENV}); send the image with the label instead"
            )
        if png is None or age > self.ttl_s:
            raise ExpiredPredictionError(
                f"prediction id {prediction_id!r} expired: inputs are kept for {self.ttl_s:g} s ({TTL_ENV}); "
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
        from service.decode import DecodeLimits, open_image

        limits = DecodeLimits(max_pixels=2**40, max_image_bytes=max(len(blob), 1))  # it was accepted when it came in
        return prepare_image(open_image(blob, limits), self.max_short_side)


# --------------------------------------------------------------------------------------------- CLI


def data_add(
    folder: Annotated[
        Path, typer.Argument(help="ImageFolder: DIR/<class>/<image>, or DIR/{train,val,test}/<class>/<image>")
    ],
    adapter: Annotated[str, typer.Option(help="adapter the labels are for (need not be registered yet)")],
    base: Annotated[
        Path | None, typer.Option(help="base model dir, whose classes are the valid labels [default: embedded model]")
    ] = None,
) -> None:
    """Import a labelled ImageFolder into ADAPTER's label store (what `retrain` trains and gates on).

    Without train/val/test folders every image is split train/holdout by hashing; with them, train stays train
    and val/test become holdout. Unreadable images are skipped and counted."""
    from rich.console import Console

    from models import paths
    from models.artifacts import ArtifactError, read_json
    from pipelines.data import DataError

    console = Console()
    base = base or paths.default_model_dir()
    try:
        classes = read_json(base / "model.json")["classes"]
        report = LabelStore(paths.home()).import_folder(adapter, folder, classes)
    except (ArtifactError, DataError, LabelError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(
        f"{adapter}: {report.added} new, {report.updated} relabelled example(s) from {folder} "
        f"({', '.join(f'{k}: {v}' for k, v in report.per_split.items())})"
    )
    if report.skipped:
        console.print(f"[yellow]skipped {len(report.skipped)} unreadable file(s):[/yellow] {_shorten(report.skipped)}")
