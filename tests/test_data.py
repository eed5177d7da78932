"""pipelines.data: ImageFolder loading (split and flat), errors, skipped files, fingerprints, digits, subsets."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data import (
    DataError,
    DataSplits,
    ImageSet,
    digits_splits,
    load_image_folder,
    per_class_subset,
    write_image_folder,
)


def _tagged(uid: int, size: int = 8) -> Image.Image:
    """An RGB image whose pixel (0, 0) encodes `uid`, so it can be recognised after a round trip."""
    arr = np.full((size, size, 3), 7, np.uint8)
    arr[0, 0] = (uid % 256, uid // 256, 200)
    return Image.fromarray(arr)


def _uid(image: Image.Image) -> int:
    r, g, _ = image.convert("RGB").getpixel((0, 0))
    return r + 256 * g


def _write_classes(root: Path, counts: dict[str, int], start: int = 0) -> dict[int, str]:
    """root/<class>/<n>.png with unique tags; returns {uid: class}."""
    owner, uid = {}, start
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _tagged(uid).save(root / name / f"img{i:03d}.png")
            owner[uid] = name
            uid += 1
    return owner


def _png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(size * size * 3, dtype=np.uint8).reshape(size, size, 3)).save(buf, "PNG")
    return buf.getvalue()


def _uids(dataset: ImageSet) -> list[int]:
    return [_uid(im) for im in dataset.images]


# ---------------------------------------------------------------------------------------------- split layout


def test_split_tree_loads_each_split_with_its_labels(tmp_path):
    owners = {}
    for k, split in enumerate(("train", "val", "test")):
        counts = {"cat": 3 + k, "dog": 2, "emu": 1 + k}
        owners[split] = _write_classes(tmp_path / split, counts, start=100 * k)
    (tmp_path / "README.txt").write_text("not a split")

    splits = load_image_folder(tmp_path)

    assert splits.classes == ["cat", "dog", "emu"]
    assert splits.sizes() == {"train": 6, "val": 8, "test": 10}
    for split in ("train", "val", "test"):
        ds = getattr(splits, split)
        assert ds.classes == ["cat", "dog", "emu"]
        # every image carries the label of the folder it was written to
        assert [ds.classes[label] for label in ds.labels] == [owners[split][u] for u in _uids(ds)]
        assert sorted(_uids(ds)) == sorted(owners[split])
        assert ds.skipped == []


# ---------------------------------------------------------------------------------------------- flat layout


FLAT_COUNTS = {"a": 40, "b": 20, "c": 7}


@pytest.fixture
def flat_root(tmp_path) -> tuple[Path, dict[int, str]]:
    return tmp_path, _write_classes(tmp_path, FLAT_COUNTS)


@pytest.mark.parametrize(
    "fractions",
    [
        pytest.param((0.7, 0.15, 0.15), id="default-70-15-15"),
        pytest.param((0.5, 0.25, 0.25), id="50-25-25"),
        pytest.param((0.6, 0.2, 0.2), id="60-20-20"),
    ],
)
def test_flat_folder_split_is_stratified_disjoint_and_complete(flat_root, fractions):
    root, owner = flat_root
    splits = load_image_folder(root, fractions=fractions, seed=3)
    parts = [splits.train, splits.val, splits.test]

    uids = [_uids(p) for p in parts]
    assert sorted(sum(uids, [])) == sorted(owner), "every image lands in exactly one split"
    for p, u in zip(parts, uids, strict=True):
        assert p.classes == ["a", "b", "c"]
        assert [p.classes[label] for label in p.labels] == [owner[x] for x in u]
    for k, frac in enumerate(fractions):
        per_class = Counter(owner[x] for x in uids[k])
        for name, n in FLAT_COUNTS.items():
            # rounding per class: within one image of the requested proportion
            assert abs(per_class[name] - frac * n) <= 1, (k, name, per_class[name], frac * n)


def test_flat_folder_same_seed_same_split_other_seed_different(flat_root):
    root, _ = flat_root
    first = load_image_folder(root, seed=11)
    again = load_image_folder(root, seed=11)
    other = load_image_folder(root, seed=12)
    for split in ("train", "val", "test"):
        assert _uids(getattr(first, split)) == _uids(getattr(again, split))
    assert {s: sorted(_uids(getattr(first, s))) for s in ("val", "test")} != {
        s: sorted(_uids(getattr(other, s))) for s in ("val", "test")
    }
    assert first.sizes() == other.sizes()


# ---------------------------------------------------------------------------------------------- errors


def _build_missing(root: Path) -> str:
    return f"data folder {root / 'nope'} does not exist"


def _build_empty(root: Path) -> str:
    (root / ".hidden").mkdir()  # hidden folders are not classes
    (root / "notes.txt").write_text("x")
    return f"no class folders in {root}: expected {root}/<class name>/<image files>"


def _build_unreadable(root: Path) -> str:
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "broken.png").write_bytes(b"definitely not a png")
        (root / name / "notes.txt").write_text("ignored")
    return f"no readable images under {root} (2 unreadable files skipped)"


def _build_one_class(root: Path) -> str:
    _write_classes(root, {"only": 3})
    return f"only one class ('only') under {root}: a classifier needs at least two"


def _build_one_class_splits(root: Path) -> str:
    for split in ("train", "val", "test"):
        _write_classes(root / split, {"solo": 2})
    return f"only one class ('solo') under {root}: a classifier needs at least two"


def _build_class_mismatch(root: Path) -> str:
    _write_classes(root / "train", {"a": 1, "b": 1})
    _write_classes(root / "val", {"a": 1, "c": 1})
    _write_classes(root / "test", {"a": 1, "b": 1})
    return (
        f"class folders differ between splits under {root} (train: a, b; val: a, c; test: a, b); "
        "every split needs the same"
    )


def _build_train_val_only(root: Path) -> str:
    _write_classes(root / "train", {"a": 1, "b": 1})
    _write_classes(root / "val", {"a": 1, "b": 1})
    return f"{root} has train, val but not test: give all three or none"


def _build_test_only(root: Path) -> str:
    _write_classes(root / "test", {"a": 1, "b": 1})
    return f"{root} has test but not train, val: give all three or none"


def _build_split_without_images(root: Path) -> str:
    _write_classes(root / "train", {"a": 1, "b": 1})
    _write_classes(root / "test", {"a": 1, "b": 1})
    (root / "val" / "a").mkdir(parents=True)
    (root / "val" / "b").mkdir(parents=True)
    return f"no readable images under {root / 'val'} (0 unreadable files skipped)"


@pytest.mark.parametrize(
    "build, subdir",
    [
        pytest.param(_build_missing, "nope", id="missing-folder"),
        pytest.param(_build_empty, "", id="no-class-folders"),
        pytest.param(_build_unreadable, "", id="no-readable-images"),
        pytest.param(_build_one_class, "", id="one-class-flat"),
        pytest.param(_build_one_class_splits, "", id="one-class-splits"),
        pytest.param(_build_class_mismatch, "", id="classes-differ-between-splits"),
        pytest.param(_build_train_val_only, "", id="train-val-without-test"),
        pytest.param(_build_test_only, "", id="test-only"),
        pytest.param(_build_split_without_images, "", id="split-with-empty-class-folders"),
    ],
)
def test_load_image_folder_errors(tmp_path, build, subdir):
    expected = build(tmp_path)
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        load_image_folder(tmp_path / subdir)
    assert str(err.value) == expected
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------------------------- skipped files


@pytest.mark.parametrize(
    "layout",
    [pytest.param("flat", id="flat"), pytest.param("splits", id="train-val-test")],
)
def test_unreadable_files_are_skipped_and_counted_non_images_ignored(tmp_path, layout):
    good = _png_bytes()
    bad_files = {
        "text.png": b"hello, I am text",
        "truncated.png": good[: len(good) // 2],
        "empty.jpg": b"",
        "garbage.JPEG": bytes(range(256)) * 4,
    }
    roots = [tmp_path] if layout == "flat" else [tmp_path / s for s in ("train", "val", "test")]
    expected_skipped = {}
    for root in roots:
        _write_classes(root, {"a": 5, "b": 5})
        expected_skipped[root] = []
        for name, data in bad_files.items():
            (root / "a" / name).write_bytes(data)
            expected_skipped[root].append(str(root / "a" / name))
        (root / "b" / "labels.csv").write_text("x,y\n")
        (root / "b" / "notes.txt").write_bytes(good)  # a real PNG, but the extension is not an image one
        (root / "b" / "nested").mkdir()
        (root / "b" / "nested" / "deep.PNG").write_bytes(good)  # nested + upper-case extension: loaded

    splits = load_image_folder(tmp_path, seed=0)

    if layout == "flat":
        assert sorted(splits.train.skipped) == sorted(expected_skipped[tmp_path])
        assert sum(splits.sizes().values()) == 11
        labels = splits.train.labels + splits.val.labels + splits.test.labels
        assert Counter(labels) == {0: 5, 1: 6}
    else:
        for split, root in zip(("train", "val", "test"), roots, strict=True):
            ds = getattr(splits, split)
            assert sorted(ds.skipped) == sorted(expected_skipped[root])
            assert len(ds) == 11
            assert Counter(ds.labels) == {0: 5, 1: 6}


# ---------------------------------------------------------------------------------------------- fingerprint


def _small_set() -> ImageSet:
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    return ImageSet(images, [0, 1, 1, 0], ["x", "y"])


def _edit_pixel(ds: ImageSet) -> ImageSet:
    images = [im.copy() for im in ds.images]
    r, g, b = images[2].getpixel((3, 5))
    images[2].putpixel((3, 5), ((r + 1) % 256, g, b))
    return ImageSet(images, list(ds.labels), list(ds.classes))


def _edit_label(ds: ImageSet) -> ImageSet:
    labels = list(ds.labels)
    labels[3] = 1
    return ImageSet(list(ds.images), labels, list(ds.classes))


def _edit_class_name(ds: ImageSet) -> ImageSet:
    return ImageSet(list(ds.images), list(ds.labels), ["x", "z"])


def _edit_order(ds: ImageSet) -> ImageSet:
    return ds.subset([1, 0, 2, 3])


def _drop_one(ds: ImageSet) -> ImageSet:
    return ds.subset([0, 1, 2])


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_edit_pixel, id="one-pixel"),
        pytest.param(_edit_label, id="one-label"),
        pytest.param(_edit_class_name, id="class-name"),
        pytest.param(_edit_order, id="order"),
        pytest.param(_drop_one, id="one-image-fewer"),
    ],
)
def test_fingerprint_changes_with_content(edit):
    ds = _small_set()
    assert edit(ds).fingerprint() != ds.fingerprint()


def test_fingerprint_is_stable_for_equal_content(tmp_path):
    ds = _small_set()
    fp = ds.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    copy = ImageSet([im.copy() for im in ds.images], list(ds.labels), list(ds.classes))
    assert copy.fingerprint() == fp
    assert ds.with_transform(lambda im: im).fingerprint() == fp
    assert ds.subset([0, 1, 2, 3]).fingerprint() == fp
    assert ds.fingerprint() == fp  # computing it does not mutate anything


@pytest.mark.parametrize(
    "a, b",
    [
        pytest.param(Image.new("L", (4, 2), 9), Image.new("L", (2, 4), 9), id="transposed-size"),
        pytest.param(Image.new("L", (3, 1), 9), Image.new("RGB", (1, 1), (9, 9, 9)), id="mode"),
    ],
)
def test_fingerprint_distinguishes_image_geometry(a, b):
    assert ImageSet([a], [0], ["x", "y"]).fingerprint() != ImageSet([b], [0], ["x", "y"]).fingerprint()


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return digits_splits()


def test_digits_splits_shape_classes_and_sizes(digits):
    assert digits.classes == [str(i) for i in range(10)]
    sizes = digits.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    for split in ("train", "val", "test"):
        ds = getattr(digits, split)
        assert {im.size for im in ds.images} == {(32, 32)}
        assert {im.mode for im in ds.images} == {"RGB"}
        assert set(ds.labels) == set(range(10)), f"{split} has every digit"
        assert len(ds.labels) == len(ds.images)
    # a digit is an image, not a constant: dark background and bright strokes
    arr = np.asarray(digits.train.images[0])
    assert arr.min() == 0 and arr.max() > 200
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_digits_splits_are_deterministic(digits):
    again = digits_splits()
    for split in ("train", "val", "test"):
        assert getattr(again, split).fingerprint() == getattr(digits, split).fingerprint()
    other = digits_splits(seed=1)
    assert other.sizes() == digits.sizes()
    assert other.test.fingerprint() != digits.test.fingerprint()


@pytest.mark.parametrize("size", [pytest.param(8, id="8px"), pytest.param(20, id="20px")])
def test_digits_splits_size(size):
    ds = digits_splits(size).val
    assert {im.size for im in ds.images} == {(size, size)}


# ---------------------------------------------------------------------------------------------- per_class_subset


def _labelled_set(counts: list[int]) -> ImageSet:
    images, labels, uid = [], [], 0
    for label, n in enumerate(counts):
        for _ in range(n):
            images.append(_tagged(uid))
            labels.append(label)
            uid += 1
    return ImageSet(images, labels, [f"c{i}" for i in range(len(counts))])


@pytest.mark.parametrize(
    "counts, per_class, expected",
    [
        pytest.param([10, 10, 10], 3, [3, 3, 3], id="all-large"),
        pytest.param([10, 2, 0, 5], 4, [4, 2, 0, 4], id="some-small-one-empty"),
        pytest.param([3, 3], 10, [3, 3], id="n-above-every-class"),
        pytest.param([5, 5], 0, [0, 0], id="zero"),
    ],
)
def test_per_class_subset_counts(counts, per_class, expected):
    ds = _labelled_set(counts)
    sub = per_class_subset(ds, per_class, seed=2)
    got = Counter(sub.labels)
    assert [got[c] for c in range(len(counts))] == expected
    assert sub.classes == ds.classes
    label_of = {_uid(im): label for im, label in zip(ds.images, ds.labels, strict=True)}
    sub_uids = _uids(sub)
    assert len(set(sub_uids)) == len(sub_uids), "no image picked twice"
    assert [label_of[u] for u in sub_uids] == sub.labels


def test_per_class_subset_reproducible_and_seeded():
    ds = _labelled_set([30, 30])
    a = _uids(per_class_subset(ds, 5, seed=0))
    assert _uids(per_class_subset(ds, 5, seed=0)) == a
    assert _uids(per_class_subset(ds, 5, seed=1)) != a


# ---------------------------------------------------------------------------------------------- write/load round trip


def _content(ds: ImageSet) -> Counter:
    return Counter((ds.classes[label], im.tobytes()) for im, label in zip(ds.images, ds.labels, strict=True))


def test_write_image_folder_round_trips(tmp_path):
    rng = np.random.default_rng(0)

    def make(n: int) -> ImageSet:
        images = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(n)]
        return ImageSet(images, [int(x) for x in rng.integers(0, 3, n)], ["ant", "bee", "cow"])

    original = DataSplits(make(9), make(5), make(6))
    for split in (original.train, original.val, original.test):
        split.labels[:3] = [0, 1, 2]  # every class present in every split

    out = write_image_folder(original, tmp_path / "out")
    assert out == tmp_path / "out"
    assert sorted(p.relative_to(out).parts[0] for p in out.iterdir()) == ["test", "train", "val"]
    loaded = load_image_folder(out)

    assert loaded.classes == ["ant", "bee", "cow"]
    assert loaded.sizes() == original.sizes()
    for split in ("train", "val", "test"):
        assert _content(getattr(loaded, split)) == _content(getattr(original, split))
        assert getattr(loaded, split).skipped == []


# ---------------------------------------------------------------------------------------------- bugs


def test_class_folder_without_images_is_an_error(tmp_path):
    _write_classes(tmp_path, {"a": 6})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=re.escape("no readable images")):
        load_image_folder(tmp_path)


def test_flat_folder_too_small_to_split_is_an_error(tmp_path):
    _write_classes(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="too few images"):
        load_image_folder(tmp_path)


def test_split_fractions_never_put_an_image_in_two_splits(tmp_path):
    _write_classes(tmp_path, {"a": 3, "b": 3})
    try:
        splits = load_image_folder(tmp_path, fractions=(0.0, 0.5, 0.5))
    except DataError:
        return  # refusing the fractions is a fine fix too
    uids = [u for s in (splits.train, splits.val, splits.test) for u in _uids(s)]
    assert sorted(uids) == list(range(6))
