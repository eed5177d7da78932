"""Label store and prediction-input cache: validation, dedupe, deterministic splits, import, expiry, bounds.

Every test runs on both backends of the state database (`db_url`): SQLite under the store's home, then PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, inspect, select

from models.db import Database
from models.preprocessing import Preprocessing
from models.state import open_state
from pipelines.data import DataError
from pipelines.label_db import labels
from pipelines.label_images import example_id, prepare_image
from pipelines.label_trust import Trust
from pipelines.labels import LabelError, LabelStore
from service.inputs import ExpiredPredictionError, InputCache, UnknownPredictionError, feedback_inputs

CLASSES = ["cat", "dog", "fox"]


def image(seed: int, size: tuple[int, int] = (16, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


pytestmark = pytest.mark.usefixtures("backend")  # every test on both backends (tests/conftest.py)


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    return LabelStore(tmp_path / "home")


# --------------------------------------------------------------------------------------------- LabelStore


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("wolf", "unknown label 'wolf' for adapter 'site-a'; valid labels: cat, dog, fox"),
        ("Cat", "unknown label 'Cat' for adapter 'site-a'; valid labels: cat, dog, fox"),
        (1, "unknown label 1 for adapter 'site-a'; valid labels: cat, dog, fox"),
    ],
    ids=["unknown", "case-matters", "not-a-string"],
)
def test_unknown_label_lists_valid_classes(store: LabelStore, label, message: str) -> None:
    with pytest.raises(LabelError) as err:
        store.add("site-a", image(0), label, CLASSES, "feedback")
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)
    assert store.count("site-a") == 0


def test_invalid_adapter_name_and_empty_source_are_refused(store: LabelStore) -> None:
    with pytest.raises(LabelError, match=r"invalid adapter name 'Site A'"):
        store.add("Site A", image(0), "cat", CLASSES, "feedback")
    with pytest.raises(LabelError, match="source must say where the label came from"):
        store.add("site-a", image(0), "cat", CLASSES, "")


def test_a_higher_trust_label_replaces_label_keeps_id_split_and_history(store: LabelStore) -> None:
    first = store.add("site-a", image(1), "cat", CLASSES, "feedback", prediction_id="p1").label_id
    again = store.add("site-a", image(1), "dog", CLASSES, "feedback", prediction_id="p1", trust=Trust.TRUSTED)
    assert again.label_id == first and (again.stored_label, again.outcome) == ("dog", "relabelled")
    assert store.count("site-a") == 1
    record = store.get(first)
    assert (record.label, record.prediction_id, record.source) == ("dog", "p1", "feedback")
    assert record.updated_at >= record.created_at
    assert [h["label"] for h in store.history(first)] == ["cat", "dog"]
    # the same pixels uploaded without a prediction id are the same example too; another image is not
    assert store.add("site-a", image(1), "fox", CLASSES, "upload", trust=Trust.ADMIN).label_id == first
    assert store.get(first).prediction_id == "p1"  # an upload without an id keeps the recorded one
    assert store.add("site-a", image(2), "fox", CLASSES, "upload").label_id != first
    assert store.add("site-b", image(1), "fox", CLASSES, "upload").label_id != first  # per adapter
    assert store.summary("site-a")["per_label"] == {"fox": 2}
    assert store.summary("site-a")["per_source"] == {"upload": 2}


def test_count_since_counts_new_and_relabelled(store: LabelStore) -> None:
    store.add("site-a", image(1), "cat", CLASSES, "feedback")
    mark = store.get(store.add("site-a", image(2), "cat", CLASSES, "feedback").label_id).updated_at
    assert store.count("site-a") == 2
    assert store.count("site-a", since=mark) == 1
    assert store.count("site-a", since=mark + 3600) == 0
    assert store.count("nobody") == 0


def _ids_by_split(store: LabelStore, ids: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "holdout": set()}
    for i in ids:
        out[store.get(i).split].add(i)
    return out


def test_split_is_deterministic_stable_and_close_to_the_fraction(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = LabelStore(home)
    ids = [store.add("site-a", image(k), CLASSES[k % 3], CLASSES, "feedback").label_id for k in range(200)]
    before = _ids_by_split(store, ids)
    assert 0.22 < len(before["holdout"]) / 200 < 0.38
    train, holdout = store.dataset("site-a", CLASSES)
    assert (len(train), len(holdout)) == (len(before["train"]), len(before["holdout"]))
    # more labels later, a reopened store, relabelling: no example changes split
    more = [store.add("site-a", image(1000 + k), "cat", CLASSES, "upload").label_id for k in range(30)]
    store.add("site-a", image(0), "fox", CLASSES, "feedback", trust=Trust.TRUSTED)  # a trusted correction
    reopened = LabelStore(home)
    assert _ids_by_split(reopened, ids) == before
    # the same data gives the same pixels in the same order
    train2, holdout2 = reopened.dataset("site-a", CLASSES)
    assert len(train2) + len(holdout2) == 230
    assert reopened.dataset("site-a", CLASSES)[1].fingerprint() == holdout2.fingerprint()
    # a larger holdout fraction only moves examples from train to holdout
    wider = _ids_by_split(LabelStore(home, holdout_fraction=0.5), ids + more)
    assert _ids_by_split(reopened, ids)["holdout"] <= wider["holdout"]


def test_dataset_leaves_out_labels_no_longer_in_the_class_list(store: LabelStore) -> None:
    store.add("site-a", image(1), "cat", CLASSES, "feedback")
    store.add("site-a", image(2), "fox", CLASSES, "feedback")
    train, holdout = store.dataset("site-a", ["cat", "dog"], holdout_fraction=0.01)
    assert len(train) + len(holdout) == 1
    assert [train.classes[k] for k in train.labels + holdout.labels] == ["cat"]
    assert len(train.skipped) == 1 and "label 'fox'" in train.skipped[0]


def _write_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    for k, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image(seed + 100 * k + i).save(root / name / f"{i}.png")


def test_import_folder_skips_unreadable_files_and_records_the_source(store: LabelStore, tmp_path: Path) -> None:
    folder = tmp_path / "labelled"
    _write_folder(folder, {"cat": 4, "dog": 3})
    (folder / "dog" / "broken.png").write_bytes(b"not a png at all")
    (folder / "dog" / "notes.txt").write_text("ignored: not an image extension")
    report = store.import_folder("site-a", folder, CLASSES)
    assert (report.added, report.updated) == (7, 0)
    assert report.skipped == [str(folder.absolute() / "dog" / "broken.png")]
    assert store.summary("site-a")["per_label"] == {"cat": 4, "dog": 3}
    assert store.summary("site-a")["per_source"] == {"import": 7}
    again = store.import_folder("site-a", folder, CLASSES)
    assert (again.added, again.updated) == (0, 7)
    assert store.count("site-a") == 7


def test_import_folder_with_splits_keeps_train_and_holds_out_val_test(store: LabelStore, tmp_path: Path) -> None:
    folder = tmp_path / "splits"
    _write_folder(folder / "train", {"cat": 5, "dog": 5}, seed=0)
    _write_folder(folder / "val", {"cat": 2, "dog": 2}, seed=1000)
    _write_folder(folder / "test", {"cat": 3, "dog": 3}, seed=2000)
    report = store.import_folder("site-a", folder, CLASSES)
    assert report.per_split == {"train": 10, "val": 4, "test": 6}
    train, holdout = store.dataset("site-a", CLASSES)
    assert (len(train), len(holdout)) == (10, 10)


def test_import_folder_refuses_unknown_classes_before_storing_anything(store: LabelStore, tmp_path: Path) -> None:
    folder = tmp_path / "labelled"
    _write_folder(folder, {"cat": 2, "wolf": 2})
    with pytest.raises(LabelError) as err:
        store.import_folder("site-a", folder, CLASSES)
    assert str(err.value) == (
        f"class folder(s) wolf under {folder.absolute()} are not labels of adapter 'site-a'; "
        "valid labels: cat, dog, fox"
    )
    assert store.count("site-a") == 0
    with pytest.raises(DataError, match="no class folders"):
        store.import_folder("site-a", tmp_path / "labelled" / "cat", CLASSES)


def test_labels_are_durable_rows_in_the_state_database(store: LabelStore) -> None:
    label_id = store.add("site-a", image(3, (40, 20)), "dog", CLASSES, "upload", sender="token:labeller-1").label_id
    fresh = Database(store.database.url)  # another engine, as another process would read them
    with fresh.read() as conn:
        c = labels.c
        row = conn.execute(select(c.adapter, c.label, c.source, c.width, c.height).where(c.id == label_id))
        assert tuple(row.one()) == ("site-a", "dog", "upload", 40, 20)
        row = conn.execute(select(c.trust, c.sender).where(c.id == label_id))
        assert tuple(row.one()) == (0, "token:labeller-1")
    fresh.dispose()
    if store.database.is_sqlite:
        with sqlite3.connect(store.home / "state.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_data_add_command_imports_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from pipelines.labels_cli import data_add

    home, base = tmp_path / "home", tmp_path / "base"
    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    base.mkdir()
    (base / "model.json").write_text(json.dumps({  # the keys every model.json has (models/metadata.py)
        "kind": "model", "backbone": "resnet18", "classes": CLASSES,
        "preprocessing": {"crop_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}}))
    _write_folder(tmp_path / "new", {"cat": 2, "fox": 1})
    (tmp_path / "new" / "fox" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    app = typer.Typer()
    app.command("add")(data_add)
    app.command("other")(lambda: None)  # two commands, so "add" is addressed by name as in `adaptserve data add`
    result = CliRunner().invoke(app, ["add", "--adapter", "site-a", str(tmp_path / "new"), "--base", str(base)])
    assert result.exit_code == 0, result.output
    assert "site-a: 3 new, 0 relabelled" in result.output
    assert "skipped 1 unreadable file(s)" in result.output
    assert LabelStore(home).count("site-a") == 3
    bad = CliRunner().invoke(app, ["add", "--adapter", "site-a", str(tmp_path / "nope"), "--base", str(base)])
    assert bad.exit_code == 2 and "error:" in bad.output
    assert LabelStore(home).count("site-a") == 3


# --------------------------------------------------------------------------------------------- trust and conflicts

U, T, A = Trust.UNTRUSTED, Trust.TRUSTED, Trust.ADMIN


@pytest.mark.parametrize(
    ("first", "second", "outcome", "stored", "conflicted", "resolution"),
    [
        (("cat", U), ("cat", U), "same", ("cat", U), False, None),
        (("cat", U), ("cat", T), "same", ("cat", T), False, None),
        (("cat", T), ("cat", U), "same", ("cat", T), False, None),
        (("cat", U), ("dog", T), "relabelled", ("dog", T), False, "replaced"),
        (("cat", U), ("dog", A), "relabelled", ("dog", A), False, "replaced"),
        (("cat", T), ("dog", A), "relabelled", ("dog", A), False, "replaced"),
        (("cat", A), ("dog", A), "relabelled", ("dog", A), False, "replaced"),
        (("cat", U), ("dog", U), "conflict", ("cat", U), True, "pending"),
        (("cat", T), ("dog", T), "conflict", ("cat", T), True, "pending"),
        (("cat", T), ("dog", U), "conflict", ("cat", T), False, "outranked"),
        (("cat", A), ("dog", T), "conflict", ("cat", A), False, "outranked"),
        (("cat", A), ("dog", U), "conflict", ("cat", A), False, "outranked"),
    ],
    ids=[
        "same-label-same-trust",
        "same-label-raises-trust",
        "same-label-lower-trust-keeps-trust",
        "higher-trust-relabels",
        "admin-relabels-untrusted",
        "admin-relabels-trusted",
        "admin-overrides-admin",
        "untrusted-vs-untrusted-conflicts",
        "trusted-vs-trusted-conflicts",
        "untrusted-vs-trusted-is-outranked",
        "trusted-vs-admin-is-outranked",
        "untrusted-vs-admin-is-outranked",
    ],
)
def test_conflict_rules(
    store: LabelStore, first: tuple, second: tuple, outcome: str, stored: tuple, conflicted: bool, resolution
) -> None:
    added = store.add("site-a", image(1), first[0], CLASSES, "upload", trust=first[1], sender="first")
    assert (added.stored_label, added.outcome, added.conflicted) == (first[0], "added", False)
    result = store.add("site-a", image(1), second[0], CLASSES, "feedback", trust=second[1], sender="second")
    assert result.to_dict() == {
        "label_id": added.label_id, "stored_label": stored[0], "outcome": outcome, "conflicted": conflicted,
    }  # fmt: skip
    record = store.get(added.label_id)
    assert (record.label, record.trust, record.conflicted) == (stored[0], stored[1], conflicted)
    assert record.sender == ("first" if (stored[0], stored[1]) == first else "second")
    rows = store.conflicts("site-a", unresolved_only=False)
    assert [r["resolution"] for r in rows] == ([resolution] if resolution else [])
    if rows:
        assert {k: rows[0][k] for k in ("label_id", "kept_label", "offered_label", "sender", "trust")} == {
            "label_id": added.label_id, "kept_label": first[0], "offered_label": second[0], "sender": "second",
            "trust": second[1].name.lower(),
        }  # fmt: skip
        assert (rows[0]["resolved_at"] is None) == (resolution == "pending")
    summary = store.summary("site-a")
    assert (summary["conflicts"], summary["conflicted"], summary["contradictions"]) == (
        int(conflicted), int(conflicted), len(rows),
    )  # fmt: skip
    train, holdout = store.dataset("site-a", CLASSES)
    assert len(train) + len(holdout) == (0 if conflicted else 1)  # a conflicted example: not trained, not held out
    assert [h["outcome"] for h in store.history(added.label_id)] == ["added", outcome]


@pytest.mark.parametrize(
    ("settle", "stored", "settles"),
    [
        (("cat", T), "cat", True),
        (("dog", T), "dog", True),
        (("fox", A), "fox", True),
        (("cat", U), "cat", False),
        (("dog", U), "cat", False),
    ],
    ids=["higher-trust-confirms-kept", "higher-trust-picks-offered", "admin-picks-a-third", "same-trust-vote-no",
         "same-trust-again-no"],
)  # fmt: skip
def test_a_higher_trust_label_settles_a_conflict(store: LabelStore, settle: tuple, stored: str, settles: bool) -> None:
    label_id = store.add("site-a", image(1), "cat", CLASSES, "feedback").label_id
    assert store.add("site-a", image(1), "dog", CLASSES, "feedback", sender="anonymous").conflicted
    result = store.add("site-a", image(1), settle[0], CLASSES, "upload", trust=settle[1], sender="token:lab")
    assert (result.stored_label, result.conflicted) == (stored, not settles)
    assert store.get(label_id).conflicted is (not settles)
    pending = store.conflicts("site-a")
    everything = store.conflicts("site-a", unresolved_only=False)
    first = everything[-1]  # newest first: the oldest contradiction is the one that made the conflict
    assert (first["offered_label"], first["resolution"]) == ("dog", "settled" if settles else "pending")
    assert (first["resolved_label"] == stored) is settles
    assert len(pending) == (0 if settles else len(everything))
    assert store.summary("site-a")["conflicts"] == len(pending)
    assert len(store.dataset("site-a", CLASSES)[0].images + store.dataset("site-a", CLASSES)[1].images) == settles


def test_conflicted_examples_are_listed_in_skipped_and_conflicts_are_newest_first(store: LabelStore) -> None:
    ids = [store.add("site-a", image(k), "cat", CLASSES, "feedback").label_id for k in range(3)]
    for k in range(3):
        store.add("site-a", image(k), "dog", CLASSES, "feedback", prediction_id=f"p{k}")
    train, holdout = store.dataset("site-a", CLASSES)
    assert (len(train), len(holdout)) == (0, 0)
    assert sorted(train.skipped) == sorted(f"{i} (conflicting labels)" for i in ids)
    listed = store.conflicts("site-a", limit=2)
    assert [c["prediction_id"] for c in listed] == ["p2", "p1"]
    assert set(listed[0]) == {
        "id", "label_id", "adapter", "kept_label", "kept_trust", "offered_label", "trust", "source", "sender",
        "prediction_id", "at", "resolution", "resolved_label", "resolved_at",
    }  # fmt: skip
    assert store.conflicts("site-b") == []


def test_add_refuses_unknown_trust_and_an_empty_sender(store: LabelStore) -> None:
    with pytest.raises(LabelError) as err:
        store.add("site-a", image(0), "cat", CLASSES, "feedback", trust=5)
    assert str(err.value) == "unknown trust level 5; use one of untrusted (0), trusted (1), admin (2)"
    with pytest.raises(LabelError, match="sender must say who sent the label"):
        store.add("site-a", image(0), "cat", CLASSES, "feedback", sender="")
    assert store.count("site-a") == 0


def test_holdout_trust_keeps_lower_trust_labels_out_of_the_holdout_and_trains_on_them(store: LabelStore) -> None:
    trusts = [(U, T, A)[k % 3] for k in range(120)]
    ids = [store.add("site-a", image(k), "cat", CLASSES, "feedback", trust=t).label_id for k, t in enumerate(trusts)]
    hashed = [store.split_of(i) == "holdout" for i in ids]
    untrusted_holdout = sum(h and t == U for h, t in zip(hashed, trusts, strict=True))
    assert untrusted_holdout > 0
    every = store.load_split("site-a", CLASSES)  # None: the old behaviour, every label may be held out
    assert (len(every.train), len(every.holdout)) == (hashed.count(False), hashed.count(True))
    split = store.load_split("site-a", CLASSES, holdout_trust=Trust.TRUSTED)
    assert len(split.holdout) == hashed.count(True) - untrusted_holdout
    assert len(split.train) == hashed.count(False) + untrusted_holdout  # still trained on
    assert min(split.holdout_trust) == Trust.TRUSTED and split.moved_to_train == untrusted_holdout
    assert split.counts() == {
        "labels_train": len(split.train), "labels_holdout": len(split.holdout), "labels_train_untrusted": 40,
        "labels_holdout_trusted": len(split.holdout), "labels_conflicted": 0,
        "labels_moved_to_train": untrusted_holdout,
    }  # fmt: skip
    admin_only = store.dataset("site-a", CLASSES, holdout_trust=Trust.ADMIN)[1]
    assert len(admin_only) == sum(h and t == A for h, t in zip(hashed, trusts, strict=True))
    summary = store.summary("site-a")
    assert summary["per_trust"] == {"untrusted": 40, "trusted": 40, "admin": 40}
    assert summary["trusted_holdout"] == len(split.holdout)
    assert (store.count("site-a"), store.count("site-a", min_trust=Trust.TRUSTED)) == (120, 80)


def test_import_folder_labels_are_trusted_and_follow_the_conflict_rules(store: LabelStore, tmp_path: Path) -> None:
    folder = tmp_path / "labelled"
    _write_folder(folder, {"cat": 2, "dog": 2})
    feedback = store.add("site-a", image(0), "dog", CLASSES, "feedback")  # image(0) is cat/0.png: the import wins
    report = store.import_folder("site-a", folder, CLASSES)
    assert (report.added, report.updated, report.conflicts) == (3, 1, 0)
    record = store.get(feedback.label_id)
    assert (record.label, record.trust, record.sender) == ("cat", Trust.TRUSTED, "cli:data-add")
    assert record.to_dict()["trust"] == "trusted"
    relabelled = tmp_path / "relabelled"
    _write_folder(relabelled, {"fox": 2})  # the same pixels as cat/, another trusted label: a conflict each
    again = store.import_folder("site-a", relabelled, CLASSES)
    assert (again.added, again.updated, again.conflicts) == (0, 0, 2)
    assert store.summary("site-a")["conflicted"] == 2
    admin = store.import_folder("site-a", relabelled, CLASSES, trust=Trust.ADMIN, sender="token:admin")
    assert (admin.updated, admin.conflicts) == (2, 0)
    assert store.summary("site-a")["conflicts"] == 0
    assert store.get(feedback.label_id).sender == "token:admin"
    assert [(h["trust"], h["sender"], h["outcome"]) for h in store.history(feedback.label_id)] == [
        ("untrusted", "anonymous", "added"),
        ("trusted", "cli:data-add", "relabelled"),
        ("trusted", "cli:data-add", "conflict"),
        ("admin", "token:admin", "relabelled"),
    ]


_OLD_SCHEMA = """
CREATE TABLE labels (
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
CREATE INDEX labels_by_adapter ON labels (adapter, updated_at);
CREATE INDEX labels_by_prediction ON labels (prediction_id) WHERE prediction_id IS NOT NULL;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    label_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    prediction_id TEXT,
    at REAL NOT NULL
);
"""  # labels.db as the store wrote it before it recorded trust, senders and conflicts


def _old_labels_db(home: Path) -> dict[str, str]:
    """A labels.db built with the old schema: a feedback label and an imported one (ids by source)."""
    import io

    home.mkdir(parents=True)
    ids = {}
    with sqlite3.connect(home / "labels.db") as conn:
        conn.executescript(_OLD_SCHEMA)
        old = [("feedback:p1", "cat", "p1", None), ("import:/data/v", "dog", None, "holdout")]
        for k, (source, label, prediction_id, split) in enumerate(old):
            im = image(k)
            buf = io.BytesIO()
            im.save(buf, "PNG")
            ids[source.split(":")[0]] = label_id = example_id("site-a", im)
            row = (label_id, "site-a", label, source, prediction_id, split, 10.0, 10.0, 16, 16, buf.getvalue())
            conn.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            event = (label_id, label, source, prediction_id)
            conn.execute("INSERT INTO events VALUES (NULL, ?, 'site-a', ?, ?, ?, 10.0)", event)
    return ids


def test_an_old_labels_db_is_migrated_at_open(tmp_path: Path) -> None:
    home = tmp_path / "old"
    ids = _old_labels_db(home)
    store = LabelStore(home)
    assert store.migrated == ["labels.trust", "labels.sender", "events.trust", "events.sender", "events.outcome"]
    old_feedback, old_import = store.get(ids["feedback"]), store.get(ids["import"])
    assert (old_feedback.label, old_feedback.trust, old_feedback.sender) == ("cat", Trust.UNTRUSTED, "legacy")
    assert (old_import.label, old_import.trust, old_import.split) == ("dog", Trust.TRUSTED, "holdout")
    assert [(h["trust"], h["sender"], h["outcome"]) for h in store.history(ids["import"])] == [
        ("trusted", "legacy", None)
    ]
    # the old rows follow the new rules, and the new tables work
    assert store.add("site-a", image(1), "fox", CLASSES, "feedback").outcome == "conflict"  # outranked by the import
    assert store.add("site-a", image(0), "fox", CLASSES, "feedback").conflicted  # same trust as old feedback
    assert store.summary("site-a")["per_trust"] == {"untrusted": 1, "trusted": 1, "admin": 0}
    holdout = store.dataset("site-a", CLASSES, holdout_trust=Trust.TRUSTED)[1]
    assert [holdout.classes[k] for k in holdout.labels] == ["dog"]
    assert LabelStore(home).migrated == []  # once
    assert not (home / "labels.db").exists() and (home / "labels.db.imported").is_file()
    with sqlite3.connect(home / "labels.db.imported") as conn:  # read, never altered: the backup is the original
        assert "trust" not in [r[1] for r in conn.execute("PRAGMA table_info(labels)")]
    columns = [c["name"] for c in inspect(store.database.engine).get_columns("labels")]
    assert columns == [c.name for c in labels.columns]  # one shape, old or new


def test_a_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.label_db as label_db

    home = tmp_path / "old"
    ids = _old_labels_db(home)
    broken = dict(label_db._ADDED_COLUMNS, events=(("trust", "NOT A TYPE (("), *label_db._ADDED_COLUMNS["events"][1:]))
    with monkeypatch.context() as patch:
        patch.setattr(label_db, "_ADDED_COLUMNS", broken)
        with pytest.raises(sqlite3.OperationalError):
            LabelStore(home)  # the old labels were copied before reading the old events failed
    with sqlite3.connect(home / "labels.db") as conn:
        assert "trust" not in [r[1] for r in conn.execute("PRAGMA table_info(labels)")]  # the file as it was
    with open_state(home).read() as conn:
        assert conn.execute(select(func.count()).select_from(labels)).scalar_one() == 0  # rolled back, all of it
    assert LabelStore(home).get(ids["import"]).trust == Trust.TRUSTED


# --------------------------------------------------------------------------------------------- InputCache


def test_input_cache_roundtrip_survives_reopen(tmp_path: Path) -> None:
    cache = InputCache(tmp_path)
    assert cache.put_many("site-a", 3, ["p1", "p2"], [image(1), image(2)]) == 2
    assert cache.put_many("site-a", 3, ["p1"], [image(9)]) == 0  # a retried id is ignored
    adapter, version, got = InputCache(tmp_path).get("p2")
    assert (adapter, version) == ("site-a", 3)
    assert np.array_equal(np.asarray(got), np.asarray(image(2)))
    with pytest.raises(ValueError, match="got 2 prediction ids and 1 images"):
        cache.put_many("site-a", 3, ["a", "b"], [image(1)])


def test_input_cache_unknown_and_expired_ids_say_why(tmp_path: Path) -> None:
    cache = InputCache(tmp_path, ttl_s=60)
    cache.put_many("site-a", 1, ["old"], [image(1)], now=1000.0)
    with pytest.raises(UnknownPredictionError) as unknown:
        cache.get("nope")
    assert str(unknown.value) == (
        "unknown prediction id 'nope': this service made no such prediction (or made it too long ago to remember); "
        "send the image with the label instead"
    )
    expired_msg = (
        "prediction id 'old' expired: inputs are kept for 60 s (ADAPTSERVE_FEEDBACK_TTL_S); "
        "send the image with the label instead"
    )
    assert cache.get("old", now=1059.0)[0] == "site-a"
    with pytest.raises(ExpiredPredictionError) as late:  # not pruned yet, but older than the TTL
        cache.get("old", now=1061.0)
    assert str(late.value) == expired_msg
    cache.put_many("site-a", 1, ["new"], [image(2)], now=1100.0)  # prunes: "old" keeps only a tombstone
    t = feedback_inputs.c
    with cache.database.read() as conn:
        row = tuple(conn.execute(select(t.png.is_(None), t.dropped).where(t.prediction_id == "old")).one())
    assert row == (1, "ttl")
    with pytest.raises(ExpiredPredictionError) as pruned:
        cache.get("old", now=1100.0)
    assert str(pruned.value) == expired_msg
    assert isinstance(pruned.value, LookupError) and isinstance(unknown.value, LookupError)


def test_input_cache_is_bounded_and_tombstones_are_too(tmp_path: Path) -> None:
    cache = InputCache(tmp_path, ttl_s=3600, max_items=3, max_tombstones=2)
    for k in range(6):
        cache.put_many("site-a", 1, [f"p{k}"], [image(k)], now=1000.0 + k)
    assert len(cache) == 3
    assert cache.get("p5", now=1010.0)[0] == "site-a"
    with pytest.raises(ExpiredPredictionError, match=r"only the newest 3 inputs are kept \(ADAPTSERVE_FEEDBACK_MAX"):
        cache.get("p2", now=1010.0)
    with pytest.raises(UnknownPredictionError):  # beyond max_tombstones the oldest ids are forgotten
        cache.get("p0", now=1010.0)
    cache.prune(now=1000.0 + 3600 + 4.5)  # p3, p4 expire: 1 input and 2 tombstones are left
    with cache.database.read() as conn:
        assert conn.execute(select(func.count()).select_from(feedback_inputs)).scalar_one() == 3
        live = select(func.count()).where(feedback_inputs.c.png.isnot(None))
        assert conn.execute(live).scalar_one() == len(cache) == 1


def test_input_cache_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_FEEDBACK_TTL_S", "120")
    monkeypatch.setenv("ADAPTSERVE_FEEDBACK_MAX_ITEMS", "7")
    cache = InputCache.from_env(tmp_path)
    assert (cache.ttl_s, cache.max_items) == (120.0, 7)


def test_stored_inputs_reproduce_the_model_input(tmp_path: Path) -> None:
    """A big upload is stored with its shorter side at 256 px, and the model input computed from the stored
    image equals the one computed from the original (resize_size 256, as resnet18's ImageNet preset)."""
    big = image(5, (600, 400)).convert("RGBA")
    cache = InputCache(tmp_path)
    cache.put_many("site-a", 1, ["p"], [big])
    stored = cache.get("p")[2]
    assert (stored.size, stored.mode) == ((384, 256), "RGB")
    transform = Preprocessing(crop_size=224, resize_size=256).eval_transform()
    assert torch.equal(transform(big), transform(stored))
    small = image(6, (32, 32))
    assert prepare_image(small) is small  # small RGB images are kept as they are
    assert prepare_image(big, None).size == (600, 400)


def _encoded(im: Image.Image, fmt: str, **save) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def test_the_bytes_a_client_sent_are_kept_as_they_are_and_give_the_served_pixels_back(tmp_path: Path) -> None:
    """No PNG re-encode on the serving path: the sent bytes are stored (up to max_encoded_bytes) and decoded by
    get() exactly as the service decoded the request, EXIF orientation, CMYK and shrinking included."""
    from service.decode import open_image

    rotated = image(7, (40, 24)).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    jpeg = _encoded(rotated, "JPEG", quality=90, exif=exif)
    big = _encoded(image(8, (600, 400)), "PNG")
    served = [open_image(jpeg), open_image(big)]
    assert served[0].size == (24, 40)  # the service applied the orientation

    cache = InputCache(tmp_path, max_encoded_bytes=len(jpeg))
    cache.put_many("site-a", 1, ["j", "b"], served, encoded=[jpeg, big])
    with cache.database.read() as conn:
        stored = dict(conn.execute(select(feedback_inputs.c.prediction_id, feedback_inputs.c.png)).all())
    assert stored["j"] == jpeg  # kept as sent
    assert stored["b"] != big and len(stored["b"]) > 0  # over the limit: a PNG of the shrunk image instead
    got = cache.get("j")[2]
    assert (got.mode, got.size) == ("RGB", (24, 40)) and got.tobytes() == served[0].tobytes()
    assert cache.get("b")[2].tobytes() == prepare_image(served[1]).tobytes()
    with pytest.raises(ValueError, match="one id each"):
        cache.put_many("site-a", 1, ["x"], served[:1], encoded=[jpeg, big])
