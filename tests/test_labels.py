"""Label store and prediction-input cache: validation, dedupe, deterministic splits, import, expiry, bounds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocessing import Preprocessing
from pipelines.data import DataError
from pipelines.labels import (
    ExpiredPredictionError,
    InputCache,
    LabelError,
    LabelStore,
    UnknownPredictionError,
    prepare_image,
)

CLASSES = ["cat", "dog", "fox"]


def image(seed: int, size: tuple[int, int] = (16, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


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


def test_duplicate_feedback_replaces_label_keeps_id_split_and_history(store: LabelStore) -> None:
    first = store.add("site-a", image(1), "cat", CLASSES, "feedback", prediction_id="p1")
    again = store.add("site-a", image(1), "dog", CLASSES, "feedback", prediction_id="p1")
    assert again == first
    assert store.count("site-a") == 1
    record = store.get(first)
    assert (record.label, record.prediction_id, record.source) == ("dog", "p1", "feedback")
    assert record.updated_at >= record.created_at
    assert [h["label"] for h in store.history(first)] == ["cat", "dog"]
    # the same pixels uploaded without a prediction id are the same example too; another image is not
    assert store.add("site-a", image(1), "fox", CLASSES, "upload") == first
    assert store.get(first).prediction_id == "p1"  # an upload without an id keeps the recorded one
    assert store.add("site-a", image(2), "fox", CLASSES, "upload") != first
    assert store.add("site-b", image(1), "fox", CLASSES, "upload") != first  # per adapter
    assert store.summary("site-a")["per_label"] == {"fox": 2}
    assert store.summary("site-a")["per_source"] == {"upload": 2}


def test_count_since_counts_new_and_relabelled(store: LabelStore) -> None:
    store.add("site-a", image(1), "cat", CLASSES, "feedback")
    mark = store.get(store.add("site-a", image(2), "cat", CLASSES, "feedback")).updated_at
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
    ids = [store.add("site-a", image(k), CLASSES[k % 3], CLASSES, "feedback") for k in range(200)]
    before = _ids_by_split(store, ids)
    assert 0.22 < len(before["holdout"]) / 200 < 0.38
    train, holdout = store.dataset("site-a", CLASSES)
    assert (len(train), len(holdout)) == (len(before["train"]), len(before["holdout"]))
    # more labels later, a reopened store, relabelling: no example changes split
    more = [store.add("site-a", image(1000 + k), "cat", CLASSES, "upload") for k in range(30)]
    store.add("site-a", image(0), "fox", CLASSES, "feedback")
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


def test_labels_are_durable_rows_in_sqlite(store: LabelStore) -> None:
    label_id = store.add("site-a", image(3, (40, 20)), "dog", CLASSES, "upload")
    with sqlite3.connect(store.path) as conn:
        row = conn.execute("SELECT adapter, label, source, width, height FROM labels WHERE id = ?", (label_id,))
        assert row.fetchone() == ("site-a", "dog", "upload", 40, 20)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_data_add_command_imports_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from pipelines.labels import data_add

    home, base = tmp_path / "home", tmp_path / "base"
    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    base.mkdir()
    (base / "model.json").write_text(json.dumps({"classes": CLASSES}))
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
    with sqlite3.connect(cache.path) as conn:
        row = conn.execute("SELECT png IS NULL, dropped FROM inputs WHERE prediction_id = 'old'").fetchone()
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
    with sqlite3.connect(cache.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM inputs").fetchone()[0] == 3
        assert conn.execute("SELECT COUNT(*) FROM inputs WHERE png IS NOT NULL").fetchone()[0] == len(cache) == 1


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
    with sqlite3.connect(cache.path) as conn:
        stored = dict(conn.execute("SELECT prediction_id, png FROM inputs").fetchall())
    assert stored["j"] == jpeg  # kept as sent
    assert stored["b"] != big and len(stored["b"]) > 0  # over the limit: a PNG of the shrunk image instead
    got = cache.get("j")[2]
    assert (got.mode, got.size) == ("RGB", (24, 40)) and got.tobytes() == served[0].tobytes()
    assert cache.get("b")[2].tobytes() == prepare_image(served[1]).tobytes()
    with pytest.raises(ValueError, match="one id each"):
        cache.put_many("site-a", 1, ["x"], served[:1], encoded=[jpeg, big])
