"""Labelled data for re-fine-tuning: the durable label store. (The short-lived cache of prediction inputs that
feedback by id reads is the service's: service/inputs.py.)

`LabelStore` (in the state database) keeps every labelled image of every adapter with where it came from, who
sent it, how far that sender is trusted (`Trust`) and when. An example's id is a hash of (adapter, pixels), so
the same image labelled twice (a corrected feedback, a re-upload, a re-import) is one example, and every
labelling stays in the ``label_events`` log. A second, different label never silently overwrites the first; trust
decides (`decide`):

- a higher-trust label replaces it; an admin's label always does (an admin's correction is authoritative);
- the same trust (below admin) keeps the current label and marks the example *conflicted*: it is left out of
  training and of the holdout until a higher-trust label settles it;
- a lower-trust label keeps the current one, and the example stays usable.

Every contradiction is a row of the ``label_conflicts`` table (`LabelStore.conflicts`, counted in `summary`).

The train / holdout split hashes the example id, so an example never moves between splits while the holdout
fraction stays the same (raising the fraction only moves examples from train to holdout). With
``holdout_trust`` (what `pipelines.retrain` uses, "trusted" by default) the holdout holds only examples labelled
at that trust or above; a lower-trust example whose hash says holdout is trained on instead (it would move to
the holdout if a trusted labeller later confirmed it). What that buys: open feedback cannot grade its own
challenger, so a poisoned relabel that costs accuracy on the trusted holdout (or on the source holdout) is
rejected by the gate. What it cannot buy: poison in a region (classes, a camera's look) that the trusted
holdout does not cover goes unseen, and so does poison sent with a trusted-labeller token.

Where the parts live: the trust levels and the conflict rule in `pipelines.label_trust`, how an image is stored
(bounded size, PNG, content id) in `pipelines.label_images`, the tables and the import of a legacy labels.db in
`pipelines.label_db`, the `adaptserve data add / conflicts` commands in `pipelines.labels_cli`.

The tables live in the state database (`models.state.open_state`: ADAPTSERVE_DATABASE_URL, default SQLite under
the home), so every replica sharing a server database sees every label. Each operation takes a pooled connection
of this process's engine: safe across threads and across forked serving workers. Writes are durable (labels are
people's work) and queue on one lock (`label_db.LABELS_LOCK`), so the read-then-write of `decide` never races. A
home's legacy labels.db is imported on the first open (see `pipelines.label_db`).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import Connection, case, exists, func, insert, select, update

from models import settings
from models.db import Database
from models.registry import NAME_PATTERN
from models.state import open_state
from pipelines.data import SPLITS, ImageSet, scan_class_folder
from pipelines.label_db import LABELS_LOCK, import_legacy, label_conflicts, label_events, labels
from pipelines.label_images import DEFAULT_MAX_SHORT_SIDE, decode_png, encode_png, example_id, prepare_image
from pipelines.label_trust import Trust, decide, trust_name

_MAX_LISTED = 30


class LabelError(ValueError):
    """A label cannot be stored as given; the message says what would be accepted."""

    status_code = 400


# --------------------------------------------------------------------------------------------- checks


def holdout_score(label_id: str) -> float:
    """Uniform in [0, 1), fixed per id: an example is in the holdout iff its score < the holdout fraction."""
    digest = hashlib.blake2b(label_id.encode(), digest_size=8, person=b"adaptserve-split").digest()
    return int.from_bytes(digest, "big") / 2**64


def shorten(items: Sequence[str]) -> str:
    """The first _MAX_LISTED items joined with commas, then how many more (messages stay one readable line)."""
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_adapter(adapter: str) -> str:
    if not isinstance(adapter, str) or not re.fullmatch(NAME_PATTERN, adapter):
        raise LabelError(f"invalid adapter name {adapter!r}: must match {NAME_PATTERN}")
    return adapter


def _check_label(adapter: str, label: object, classes: Sequence[str]) -> str:
    if not isinstance(label, str) or label not in classes:
        raise LabelError(f"unknown label {label!r} for adapter {adapter!r}; valid labels: {shorten(list(classes))}")
    return label


def _check_trust(trust: object) -> Trust:
    try:
        return Trust(trust)
    except ValueError:
        levels = ", ".join(f"{trust_name(t)} ({int(t)})" for t in Trust)
        raise LabelError(f"unknown trust level {trust!r}; use one of {levels}") from None


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LabelResult:
    """What `LabelStore.add` did with one label.

    `outcome`: "added" (a new example), "same" (it had this label already; its trust is now the higher of the two),
    "relabelled" (the label outranked the stored one and replaced it) or "conflict" (the stored label was kept and
    the contradiction recorded, see `LabelStore.conflicts`). `conflicted`: the example is out of training and of
    the holdout until a higher-trust label settles it."""

    label_id: str
    stored_label: str
    outcome: str
    conflicted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# an example is conflicted while one of its contradictions is pending
_PENDING = exists().where(label_conflicts.c.label_id == labels.c.id, label_conflicts.c.resolved_at.is_(None))
_CONFLICT_COLUMNS = (
    "seq", "label_id", "adapter", "kept_label", "kept_trust", "offered_label", "trust", "source", "sender",
    "prediction_id", "at", "resolution", "resolved_label", "resolved_at",
)  # fmt: skip


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
    trust: Trust
    sender: str
    conflicted: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, trust=trust_name(self.trust))


@dataclass(frozen=True)
class _Labelling:
    """One label to store: the example (id, pixels) and who says what about it."""

    id: str
    adapter: str
    label: str
    source: str
    prediction_id: str | None
    split: str | None
    trust: Trust
    sender: str
    at: float
    width: int
    height: int
    png: bytes


@dataclass
class ImportReport:
    """What `LabelStore.import_folder` did: new examples, known ones that now carry the folder's label (relabelled
    or confirmed), known ones that kept another label (`conflicts`), unreadable files skipped."""

    added: int
    updated: int
    skipped: list[str] = field(default_factory=list)
    per_split: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0

    @property
    def total(self) -> int:
        return self.added + self.updated


@dataclass
class LabelSplit:
    """What `LabelStore.load_split` returns: (train, holdout), each example's trust, and what was held back."""

    train: ImageSet
    holdout: ImageSet
    train_trust: list[Trust] = field(default_factory=list)
    holdout_trust: list[Trust] = field(default_factory=list)
    conflicted: int = 0  # left out of both until a higher-trust label settles them
    moved_to_train: int = 0  # hashed to the holdout but below `holdout_trust`: trained on instead

    def counts(self) -> dict[str, int]:
        """How many labels of each kind were used (a retrain reports these with its gate numbers)."""
        return {
            "labels_train": len(self.train),
            "labels_holdout": len(self.holdout),
            "labels_train_untrusted": sum(t < Trust.TRUSTED for t in self.train_trust),
            "labels_holdout_trusted": sum(t >= Trust.TRUSTED for t in self.holdout_trust),
            "labels_conflicted": self.conflicted,
            "labels_moved_to_train": self.moved_to_train,
        }


# --------------------------------------------------------------------------------------------- label store


class LabelStore:
    """Every labelled image of every adapter, durably, with its source, sender, trust and times (see the module
    docstring).

    `migrated`: the columns a legacy labels.db of this home lacked (filled in when it was imported on this open);
    empty when there was none to import."""

    def __init__(
        self,
        home: str | Path,
        holdout_fraction: float = 0.3,
        max_short_side: int | None = DEFAULT_MAX_SHORT_SIDE,
    ) -> None:
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be between 0 and 1 (exclusive), got {holdout_fraction}")
        self.home = Path(home).expanduser().absolute()
        self.holdout_fraction = holdout_fraction
        self.max_short_side = max_short_side
        self._settings = settings.load()
        self.migrated = import_legacy(self.database, self.home)

    @property
    def database(self) -> Database:
        """The state database, through this process's engine (a forked worker gets its own: engines do not fork)."""
        return open_state(self.home, self._settings)

    def split_of(self, label_id: str, forced: str | None = None, holdout_fraction: float | None = None) -> str:
        fraction = self.holdout_fraction if holdout_fraction is None else holdout_fraction
        return forced or ("holdout" if holdout_score(label_id) < fraction else "train")

    # ---------------------------------------------------------------- writes

    def _labelling(
        self,
        adapter: str,
        image: Image.Image,
        label: str,
        source: str,
        prediction_id: str | None,
        split: str | None,
        trust: Trust,
        sender: str,
    ) -> _Labelling:
        image = prepare_image(image, self.max_short_side)
        return _Labelling(
            example_id(adapter, image), adapter, label, source, prediction_id, split, trust, sender, time.time(),
            image.width, image.height, encode_png(image),
        )  # fmt: skip

    def _store(self, conn: Connection, x: _Labelling) -> LabelResult:
        """Apply one labelling under the conflict rules (`decide`) and log it as an event (inside LABELS_LOCK)."""
        current = conn.execute(select(labels.c.label, labels.c.trust).where(labels.c.id == x.id)).first()
        if current is None:
            conn.execute(insert(labels).values(
                id=x.id, adapter=x.adapter, label=x.label, source=x.source, prediction_id=x.prediction_id,
                split=x.split, created_at=x.at, updated_at=x.at, width=x.width, height=x.height, png=x.png,
                trust=int(x.trust), sender=x.sender))  # fmt: skip
            outcome, stored = "added", x.label
        else:
            kept, kept_trust = current[0], Trust(current[1])
            d = decide(kept, kept_trust, x.label, x.trust)
            outcome, stored = d.outcome, x.label if d.replace else kept
            if d.replace or d.trust != kept_trust:  # the label, or who vouches for it, changed
                # split and created_at never change: an example keeps its split; no prediction id keeps the old one
                keep_id = {} if x.prediction_id is None else {"prediction_id": x.prediction_id}
                conn.execute(update(labels).where(labels.c.id == x.id).values(
                    label=stored, trust=int(d.trust), source=x.source, sender=x.sender, updated_at=x.at, **keep_id))
            if d.settles:
                conn.execute(update(label_conflicts).where(
                    label_conflicts.c.label_id == x.id, label_conflicts.c.resolved_at.is_(None),
                ).values(resolution="settled", resolved_label=stored, resolved_at=x.at))  # fmt: skip
            if d.filed:
                settled = {} if d.filed == "pending" else {"resolution": d.filed, "resolved_label": stored,
                                                           "resolved_at": x.at}  # fmt: skip
                conn.execute(insert(label_conflicts).values(
                    label_id=x.id, adapter=x.adapter, kept_label=kept, kept_trust=int(kept_trust),
                    offered_label=x.label, trust=int(x.trust), source=x.source, sender=x.sender,
                    prediction_id=x.prediction_id, at=x.at, **settled))  # fmt: skip
        conn.execute(insert(label_events).values(
            label_id=x.id, adapter=x.adapter, label=x.label, source=x.source, prediction_id=x.prediction_id, at=x.at,
            trust=int(x.trust), sender=x.sender, outcome=outcome))  # fmt: skip
        pending = conn.execute(select(label_conflicts.c.seq).where(
            label_conflicts.c.label_id == x.id, label_conflicts.c.resolved_at.is_(None)).limit(1)).first()
        return LabelResult(x.id, stored, outcome, pending is not None)

    def add(
        self,
        adapter: str,
        image: Image.Image,
        label: str,
        classes: Sequence[str],
        source: str,
        prediction_id: str | None = None,
        *,
        trust: Trust = Trust.UNTRUSTED,
        sender: str = "anonymous",
    ) -> LabelResult:
        """Store one labelled image, sent by `sender` at `trust`; returns what happened (`LabelResult`).

        Labelling an image already stored for this adapter (the same prediction again, or the same pixels from
        another route) never silently overwrites it: trust decides (see `decide`); the id and split stay, and
        every labelling stays in the event log. An unknown label raises LabelError listing the valid ones.
        """
        _check_adapter(adapter)
        _check_label(adapter, label, classes)
        trust = _check_trust(trust)
        if not source:
            raise LabelError("source must say where the label came from, e.g. 'feedback', 'upload', 'import:<dir>'")
        if not isinstance(sender, str) or not sender:
            raise LabelError("sender must say who sent the label, e.g. 'token:labeller-1', 'cli:data-add'")
        labelling = self._labelling(adapter, image, label, source, prediction_id, None, trust, sender)
        with self.database.write(lock=LABELS_LOCK) as conn:
            return self._store(conn, labelling)

    def import_folder(
        self,
        adapter: str,
        folder: str | Path,
        classes: Sequence[str],
        *,
        trust: Trust = Trust.TRUSTED,
        sender: str = "cli:data-add",
    ) -> ImportReport:
        """Import an ImageFolder: ``folder/<class>/<image>`` (split by hashing, like feedback), or
        ``folder/{train,val,test}/<class>/<image>`` where train stays train and val/test go to the holdout.

        Labels are stored at `trust` (TRUSTED: whoever can run `adaptserve data add` on the host is trusted) from
        `sender`, under the same conflict rules as `add`. Every class folder must be one of `classes` (checked
        before anything is stored); unreadable files are skipped and listed; the whole import is one transaction."""
        _check_adapter(adapter)
        trust = _check_trust(trust)
        folder = Path(folder).expanduser().absolute()
        parts = [s for s in SPLITS if (folder / s).is_dir()] or [""]
        sets = {part: scan_class_folder(folder / part) for part in parts}  # DataError (a ValueError) if unusable
        unknown = sorted({c for s in sets.values() for c in s.classes} - set(classes))
        if unknown:
            raise LabelError(
                f"class folder(s) {', '.join(unknown)} under {folder} are not labels of adapter {adapter!r}; "
                f"valid labels: {shorten(list(classes))}"
            )
        labellings, report = [], ImportReport(0, 0)
        for part, images in sets.items():
            forced = {"": None, "train": "train"}.get(part, "holdout")
            source = f"import:{folder / part}" if part else f"import:{folder}"
            for image, k in zip(images.images, images.labels, strict=True):
                labellings.append(
                    self._labelling(adapter, image, images.classes[k], source, None, forced, trust, sender)
                )
            report.skipped += images.skipped
            report.per_split[part or "all"] = len(images)
        with self.database.write(lock=LABELS_LOCK) as conn:
            outcomes = Counter(self._store(conn, x).outcome for x in labellings)
        report.added, report.updated = outcomes["added"], outcomes["same"] + outcomes["relabelled"]
        report.conflicts = outcomes["conflict"]
        return report

    # ---------------------------------------------------------------- reads

    def get(self, label_id: str) -> LabelRecord:
        c = labels.c
        with self.database.read() as conn:
            row = conn.execute(select(
                c.id, c.adapter, c.label, c.source, c.prediction_id, c.split, c.created_at, c.updated_at, c.trust,
                c.sender, _PENDING,
            ).where(c.id == label_id)).first()  # fmt: skip
        if row is None:
            raise KeyError(f"no label with id {label_id!r}")
        split = self.split_of(row[0], row[5])
        return LabelRecord(*row[:5], split, *row[6:8], Trust(row[8]), row[9], bool(row[10]))

    def count(self, adapter: str, since: float | None = None, *, min_trust: Trust = Trust.UNTRUSTED) -> int:
        """Examples of `adapter` labelled at `min_trust` or above; with `since` (unix time) only those labelled,
        relabelled or raised in trust since then (a repeated label or a conflict changes nothing)."""
        c = labels.c
        with self.database.read() as conn:
            return int(conn.execute(select(func.count()).where(
                c.adapter == adapter, c.updated_at >= (since or 0.0), c.trust >= int(min_trust))).scalar_one())

    def history(self, label_id: str) -> list[dict[str, Any]]:
        """Every labelling of one example, oldest first, with who sent it and what it did (the audit trail)."""
        keys = ("label", "source", "prediction_id", "at", "trust", "sender", "outcome")
        e = label_events.c
        with self.database.read() as conn:
            rows = conn.execute(select(*(e[k] for k in keys)).where(e.label_id == label_id).order_by(e.seq))
            out = [dict(zip(keys, r, strict=True)) for r in rows]
        return [dict(r, trust=trust_name(r["trust"])) for r in out]

    def conflicts(self, adapter: str, unresolved_only: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        """The contradictions recorded for `adapter`, newest first: by default only the pending ones (examples left
        out of training and holdout until a higher-trust label settles them). `resolution` is pending, outranked
        (a lower-trust label was refused), replaced (a higher-trust label won) or settled (a pending one, later)."""
        c = label_conflicts.c
        query = select(*(c[k] for k in _CONFLICT_COLUMNS)).where(c.adapter == adapter)
        if unresolved_only:
            query = query.where(c.resolved_at.is_(None))
        with self.database.read() as conn:
            rows = conn.execute(query.order_by(c.at.desc(), c.seq.desc()).limit(int(limit))).all()
        out = []
        for row in rows:
            found = dict(zip(_CONFLICT_COLUMNS, row, strict=True))
            found.update(trust=trust_name(found["trust"]), kept_trust=trust_name(found["kept_trust"]))
            out.append(dict(found, id=found.pop("seq"), resolution=found["resolution"] or "pending"))
        return out

    def summary(self, adapter: str) -> dict[str, Any]:
        """Counts per label, split, source kind and trust; conflicts; the trusted holdout; the time span."""
        c, k = labels.c, label_conflicts.c
        with self.database.read() as conn:
            rows = conn.execute(select(c.id, c.label, c.source, c.split, c.updated_at, c.trust, _PENDING)
                                .where(c.adapter == adapter)).all()
            pending, contradictions = conn.execute(select(
                func.coalesce(func.sum(case((k.resolved_at.is_(None), 1), else_=0)), 0), func.count(),
            ).where(k.adapter == adapter)).one()  # fmt: skip
        splits = [self.split_of(r[0], r[3]) for r in rows]
        per_trust = Counter(r[5] for r in rows)
        return {
            "adapter": adapter,
            "labels": len(rows),
            "train": splits.count("train"),
            "holdout": splits.count("holdout"),
            "holdout_fraction": self.holdout_fraction,
            "per_label": dict(sorted(Counter(r[1] for r in rows).items())),
            "per_source": dict(sorted(Counter(r[2].split(":", 1)[0] for r in rows).items())),
            "per_trust": {trust_name(t): per_trust[int(t)] for t in Trust},
            "trusted_holdout": sum(
                s == "holdout" and r[5] >= Trust.TRUSTED and not r[6] for s, r in zip(splits, rows, strict=True)
            ),
            "conflicts": int(pending),
            "conflicted": sum(bool(r[6]) for r in rows),
            "contradictions": contradictions,
            "first_at": min((r[4] for r in rows), default=None),
            "last_at": max((r[4] for r in rows), default=None),
        }

    def load_split(
        self,
        adapter: str,
        classes: Sequence[str],
        holdout_fraction: float | None = None,
        since: float | None = None,
        limit: int | None = None,
        holdout_trust: Trust | None = None,
    ) -> LabelSplit:
        """`dataset`'s (train, holdout), with each example's trust and counts of what was held back."""
        c = labels.c
        query = (select(c.id, c.label, c.split, c.trust, _PENDING, c.png)
                 .where(c.adapter == adapter, c.updated_at >= (since or 0.0))
                 .order_by(c.updated_at.desc(), c.id).limit(limit))  # limit None: all of them
        with self.database.read() as conn:
            rows = conn.execute(query).all()
        index = {c: i for i, c in enumerate(classes)}
        out = LabelSplit(ImageSet([], [], list(classes)), ImageSet([], [], list(classes)))
        # id order, not labelling order
        for label_id, label, forced, trust, conflicted, png in sorted(rows, key=lambda r: r[0]):
            if conflicted:
                out.conflicted += 1
                out.train.skipped.append(f"{label_id} (conflicting labels)")
                continue
            if label not in index:
                out.train.skipped.append(f"{label_id} (label {label!r})")
                continue
            part = self.split_of(label_id, forced, holdout_fraction)
            if part == "holdout" and holdout_trust is not None and trust < holdout_trust:
                part, out.moved_to_train = "train", out.moved_to_train + 1
            images, trusts = (out.train, out.train_trust) if part == "train" else (out.holdout, out.holdout_trust)
            images.images.append(decode_png(png))
            images.labels.append(index[label])
            trusts.append(Trust(trust))
        return out

    def dataset(
        self,
        adapter: str,
        classes: Sequence[str],
        holdout_fraction: float | None = None,
        since: float | None = None,
        limit: int | None = None,
        holdout_trust: Trust | None = None,
    ) -> tuple[ImageSet, ImageSet]:
        """(train, holdout) ImageSets of `adapter`'s labels, newest `limit` (all by default) labelled since
        `since`. Examples whose label is no longer one of `classes`, and conflicted ones, are left out and listed in
        the train set's `.skipped`. With `holdout_trust`, the holdout holds only examples labelled at that trust
        or above; a lower-trust example whose hash says holdout goes to train (still a useful label; it is the
        gate's check that must stay clean). None: every label may be in the holdout."""
        split = self.load_split(adapter, classes, holdout_fraction, since, limit, holdout_trust)
        return split.train, split.holdout
