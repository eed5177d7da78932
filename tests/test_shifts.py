"""pipelines.shifts: every corruption at every severity, reproducibility, monotone degradation, errors, CLI."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data import DataSplits, ImageSet, digits_splits, load_image_folder, scan_class_folder
from pipelines.shifts import SHIFTS, apply_shift, get_shift, shift_set, shift_splits

SEVERITIES = (1, 2, 3, 4, 5)
MONOTONE = ("gaussian_noise", "contrast", "brightness", "invert", "defocus_blur")
RANDOM_SHIFTS = ("gaussian_noise", "rotation")


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return digits_splits()


@pytest.fixture(scope="module")
def digit(digits) -> Image.Image:
    """A real 32x32 RGB digit: dark background, bright strokes, not symmetric."""
    return digits.train.images[0]


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_arr(a) - _arr(b)).mean())


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("severity", SEVERITIES, ids=[f"s{s}" for s in SEVERITIES])
@pytest.mark.parametrize("name", list(SHIFTS), ids=list(SHIFTS))
def test_every_shift_changes_the_image_and_keeps_size_and_mode(digit, name, severity):
    before = digit.copy()
    out = apply_shift(digit, name, severity, _rng())
    assert out.mode == "RGB"
    assert out.size == digit.size
    assert _mad(out, digit) > 0.5
    assert np.array_equal(np.asarray(digit), np.asarray(before)), "the input is not modified"


@pytest.mark.parametrize(
    "mode, size",
    [
        pytest.param("L", (24, 16), id="L-landscape"),
        pytest.param("RGBA", (16, 24), id="RGBA-portrait"),
        pytest.param("RGB", (64, 64), id="RGB-64px"),
    ],
)
@pytest.mark.parametrize("name", list(SHIFTS), ids=list(SHIFTS))
def test_shift_of_other_modes_and_sizes_is_rgb_of_same_size(digit, name, mode, size):
    image = digit.resize(size).convert(mode)
    out = apply_shift(image, name, 5, _rng())
    assert (out.mode, out.size) == ("RGB", size)
    assert _mad(out, image.convert("RGB")) > 0.5


@pytest.mark.parametrize("name", list(SHIFTS), ids=list(SHIFTS))
def test_same_seed_same_output(digit, name):
    a = apply_shift(digit, name, 3, _rng(42))
    b = apply_shift(digit, name, 3, _rng(42))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_gaussian_noise_depends_on_seed(digit):
    outs = {apply_shift(digit, "gaussian_noise", 2, _rng(seed)).tobytes() for seed in range(4)}
    assert len(outs) == 4


def test_rotation_sign_depends_on_seed(digit):
    outs = Counter(apply_shift(digit, "rotation", 2, _rng(seed)).tobytes() for seed in range(12))
    # one angle with a random sign: exactly two possible results, and the seed picks between them
    assert len(outs) == 2
    left, right = (Image.frombytes("RGB", digit.size, b) for b in outs)
    assert _mad(left, right) > 1.0


@pytest.mark.parametrize("name", MONOTONE, ids=MONOTONE)
def test_degradation_grows_with_severity(digits, name):
    for image in digits.test.images[:3]:
        mads = [_mad(apply_shift(image, name, s, _rng(7)), image) for s in SEVERITIES]
        assert all(a <= b for a, b in zip(mads, mads[1:], strict=False)), (name, mads)
        assert mads[-1] > mads[0], (name, mads)


def test_invert_at_full_severity_is_the_negative(digit):
    out = apply_shift(digit, "invert", 5, _rng())
    assert np.array_equal(np.asarray(out).astype(int), 255 - np.asarray(digit).astype(int))


def test_brightness_adds_and_clips():
    flat = Image.new("RGB", (8, 8), (0, 100, 250))
    out = np.asarray(apply_shift(flat, "brightness", 1, _rng()))
    level = SHIFTS["brightness"].levels[0]
    expected = np.clip(np.array([0, 100, 250]) + level * 255, 0, 255).round()
    assert np.abs(out[0, 0] - expected).max() <= 1
    assert out[0, 0, 2] == 255


@pytest.mark.parametrize(
    "name, severity, message",
    [
        pytest.param(
            "blur",
            3,
            "unknown shift 'blur'; choose one of gaussian_noise, defocus_blur, contrast, brightness, rotation, invert",
            id="unknown-name",
        ),
        pytest.param("invert", 0, "severity must be 1..5, got 0", id="severity-0"),
        pytest.param("invert", 6, "severity must be 1..5, got 6", id="severity-6"),
        pytest.param("gaussian_noise", -1, "severity must be 1..5, got -1", id="severity-negative"),
    ],
)
def test_apply_shift_errors(digit, name, severity, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        apply_shift(digit, name, severity, _rng())
    assert str(err.value) == message


def test_get_shift_error_and_record():
    assert get_shift("contrast") is SHIFTS["contrast"]
    assert all(len(s.levels) == 5 and s.help for s in SHIFTS.values())
    with pytest.raises(ValueError, match=re.escape("unknown shift 'Contrast'")):
        get_shift("Contrast")


# ------------------------------------------------------------------------------------------ shift_set / splits


def test_shift_set_draws_per_image_and_is_reproducible(digit):
    ds = ImageSet([digit, digit.copy(), digit.copy()], [1, 0, 1], ["a", "b"], transform=str)
    out = shift_set(ds, "gaussian_noise", 3, seed=5)
    again = shift_set(ds, "gaussian_noise", 3, seed=5)
    assert [im.tobytes() for im in out.images] == [im.tobytes() for im in again.images]
    assert len({im.tobytes() for im in out.images}) == 3, "identical inputs get independent noise"
    assert (out.labels, out.classes, out.transform) == ([1, 0, 1], ["a", "b"], str)
    assert out.labels is not ds.labels
    other = shift_set(ds, "gaussian_noise", 3, seed=6)
    assert other.images[0].tobytes() != out.images[0].tobytes()


@pytest.mark.parametrize("name", ["invert", "gaussian_noise"], ids=["invert", "gaussian_noise"])
def test_shift_splits_keeps_labels_and_sizes(digits, name):
    small = DataSplits(digits.train.subset(range(12)), digits.val.subset(range(5)), digits.test.subset(range(7)))
    shifted = shift_splits(small, name, 4, seed=1)
    assert shifted.sizes() == {"train": 12, "val": 5, "test": 7}
    assert shifted.classes == small.classes
    for split in ("train", "val", "test"):
        a, b = getattr(small, split), getattr(shifted, split)
        assert b.labels == a.labels
        assert [im.size for im in b.images] == [im.size for im in a.images]
        assert all(_mad(x, y) > 0.5 for x, y in zip(a.images, b.images, strict=True))


# ------------------------------------------------------------------------------------------ CLI


def _flat(output: str) -> str:
    """Rich wraps long lines (paths included) at the console width: compare without any whitespace."""
    return "".join(output.split())


def _write_tree(root: Path, counts: dict[str, int], size: int = 16) -> None:
    rng = np.random.default_rng(len(str(root)))
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def _content(ds: ImageSet, transform=lambda a: a) -> Counter:
    return Counter(
        (ds.classes[label], transform(np.asarray(im.convert("RGB"))).tobytes())
        for im, label in zip(ds.images, ds.labels, strict=True)
    )


@pytest.mark.parametrize("layout", [pytest.param("splits", id="train-val-test"), pytest.param("flat", id="flat")])
def test_cli_make_shift_invert_writes_negative_image_folder(tmp_path, layout):
    src, dst = tmp_path / "src", tmp_path / "dst"
    if layout == "splits":
        for split, n in (("train", 3), ("val", 2), ("test", 2)):
            _write_tree(src / split, {"cat": n, "dog": n + 1})
    else:
        _write_tree(src, {"cat": 5, "dog": 4})

    result = CliRunner().invoke(
        app, ["data", "make-shift", str(src), str(dst), "--shift", "invert", "--severity", "5"]
    )

    assert result.exit_code == 0, result.output
    n = 17 if layout == "splits" else 9  # (3+4) + (2+3) + (2+3), or 5+4
    assert f"wrote {n} images shifted by invert@5 to" in result.output
    if layout == "splits":
        before, after = load_image_folder(src), load_image_folder(dst)
        for split in ("train", "val", "test"):
            b, a = getattr(before, split), getattr(after, split)
            assert a.classes == b.classes == ["cat", "dog"]
            assert Counter(a.labels) == Counter(b.labels)
            assert _content(a) == _content(b, lambda x: 255 - x)
    else:
        b, a = scan_class_folder(src), scan_class_folder(dst)
        assert not (dst / "train").exists()
        assert a.classes == b.classes == ["cat", "dog"]
        assert Counter(a.labels) == {0: 5, 1: 4}
        assert _content(a) == _content(b, lambda x: 255 - x)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(
            ["--shift", "blur"],
            "error: unknown shift 'blur'; choose one of gaussian_noise, defocus_blur, contrast, brightness, rotation, "
            "invert",
            id="unknown-shift",
        ),
        pytest.param(["--shift", "invert", "--severity", "6"], "error: severity must be 1..5, got 6", id="severity-6"),
        pytest.param(["--severity", "0"], "error: severity must be 1..5, got 0", id="severity-0"),
    ],
)
def test_cli_make_shift_errors_exit_2(tmp_path, args, message):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write_tree(src, {"a": 1, "b": 1})
    result = CliRunner().invoke(app, ["data", "make-shift", str(src), str(dst), *args])
    assert result.exit_code == 2, result.output
    assert _flat(message) in _flat(result.output)
    assert not dst.exists()


def test_cli_make_shift_missing_source_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["data", "make-shift", str(tmp_path / "missing"), str(tmp_path / "dst")])
    assert result.exit_code == 2
    assert _flat(f"error: {tmp_path / 'missing'} is not a directory") in _flat(result.output)


def test_cli_export_digits(tmp_path, digits):
    dst = tmp_path / "digits"
    result = CliRunner().invoke(app, ["data", "export-digits", str(dst)])
    assert result.exit_code == 0, result.output
    assert _flat(f"wrote digits to {dst}") in _flat(result.output)
    files = sorted(dst.rglob("*.png"))
    assert len(files) == 1797
    per_split = Counter(p.relative_to(dst).parts[0] for p in files)
    assert per_split == digits.sizes()
    assert {p.parent.name for p in files} == {str(i) for i in range(10)}
    with Image.open(files[0]) as im:
        assert (im.size, im.mode) == ((32, 32), "RGB")
    # the files hold exactly the digits, class by class
    test_per_class = Counter(p.parent.name for p in files if p.relative_to(dst).parts[0] == "test")
    assert test_per_class == Counter(digits.classes[label] for label in digits.test.labels)


# ------------------------------------------------------------------------------------------ bugs


@pytest.mark.parametrize("size, severity", [pytest.param(16, 1, id="16px-s1"), pytest.param(8, 4, id="8px-s4")])
def test_defocus_blur_changes_small_images(digit, size, severity):
    image = digit.resize((size, size))
    assert _mad(apply_shift(image, "defocus_blur", severity, _rng()), image) > 0
