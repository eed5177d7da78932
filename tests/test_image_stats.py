"""image_stats on constructed images whose statistics are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from monitoring.image_stats import STAT_NAMES, batch_image_stats, image_stats


def _checkerboard(size: int, square: int) -> np.ndarray:
    """uint8 black/white checkerboard, HxWx3."""
    ys, xs = np.indices((size, size))
    board = (((ys // square) + (xs // square)) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def _halves(top: tuple[int, int, int], bottom: tuple[int, int, int], size: int = 8) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[: size // 2] = top
    img[size // 2 :] = bottom
    return img


# Closed forms (0..1 scale): a 1-pixel checkerboard has Laplacian +-4 everywhere, so variance 16.
# Red/green halves: rg = +-1 (std 1, mean 0), yb = 0.5 (std 0) -> colourfulness 1 + 0.3 * 0.5 = 1.15.
# Pure red: rg = 1, yb = 0.5 everywhere -> 0.3 * sqrt(1.25).
EXACT_CASES = [
    pytest.param(np.full((16, 16, 3), 128, np.uint8),
                 {"brightness": 128 / 255, "contrast": 0.0, "sharpness": 0.0, "colourfulness": 0.0}, id="grey"),
    pytest.param(np.zeros((16, 16, 3), np.uint8),
                 {"brightness": 0.0, "contrast": 0.0, "sharpness": 0.0, "colourfulness": 0.0}, id="black"),
    pytest.param(_checkerboard(16, 1),
                 {"brightness": 0.5, "contrast": 0.5, "sharpness": 16.0, "colourfulness": 0.0}, id="checker-1px"),
    pytest.param(_halves((255, 0, 0), (0, 255, 0)),
                 {"brightness": (0.299 + 0.587) / 2, "colourfulness": 1.15}, id="red-green"),
    pytest.param(np.full((8, 8, 3), (255, 0, 0), np.uint8),
                 {"brightness": 0.299, "contrast": 0.0, "colourfulness": 0.3 * np.sqrt(1.25)}, id="pure-red"),
    pytest.param(np.full((5, 7, 3), 255, np.uint8),
                 {"brightness": 1.0, "width": 7.0, "height": 5.0}, id="white-7x5"),
]


@pytest.mark.parametrize(("img", "expected"), EXACT_CASES)
def test_image_stats_closed_forms(img: np.ndarray, expected: dict[str, float]) -> None:
    stats = image_stats(img)
    assert tuple(stats) == STAT_NAMES
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, abs=1e-6), name


def test_checkerboard_is_sharper_than_its_blurred_version() -> None:
    sharp = Image.fromarray(_checkerboard(64, 4))
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    s_sharp, s_blur = image_stats(sharp)["sharpness"], image_stats(blurred)["sharpness"]
    # Along each axis the second difference is -+1 on the 2 edge columns of every 4-pixel run, 0 inside, with
    # the same sign for both axes; interior columns 1..62 hold 30 edge columns, so q = 30/62 and
    # Var(lap) = E[(h + v)^2] = 2q + 2q^2.
    q = 30 / 62
    assert s_sharp == pytest.approx(2 * q + 2 * q**2, rel=1e-6)
    assert s_blur < 0.05 * s_sharp
    # Blurring keeps the mean and lowers contrast.
    assert image_stats(blurred)["brightness"] == pytest.approx(0.5, abs=0.01)
    assert image_stats(blurred)["contrast"] < image_stats(sharp)["contrast"]


def test_saturated_image_is_more_colourful_than_grey() -> None:
    grey = image_stats(np.full((8, 8, 3), 128, np.uint8))["colourfulness"]
    red_green = image_stats(_halves((255, 0, 0), (0, 255, 0)))["colourfulness"]
    assert grey == 0.0
    assert red_green > 1.0


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a: a, id="uint8-rgb"),
        pytest.param(lambda a: Image.fromarray(a), id="pil-rgb"),
        pytest.param(lambda a: Image.fromarray(a).convert("RGBA"), id="pil-rgba"),
        pytest.param(lambda a: np.dstack([a, np.full(a.shape[:2], 7, np.uint8)]), id="uint8-rgba"),
        pytest.param(lambda a: a.astype(np.float32) / 255, id="float-0-1"),
        pytest.param(lambda a: a.astype(np.uint16) * 257, id="uint16"),
    ],
)
def test_input_forms_agree(convert) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = image_stats(rgb)
    got = image_stats(convert(rgb))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (got["width"], got["height"]) == (30.0, 20.0)


@pytest.mark.parametrize(
    "img",
    [
        pytest.param(np.full((6, 9), 200, np.uint8), id="hw-array"),
        pytest.param(Image.new("L", (9, 6), 200), id="pil-L"),
        pytest.param(np.full((6, 9, 1), 200, np.uint8), id="hw1-array"),
    ],
)
def test_grey_inputs(img: Image.Image | np.ndarray) -> None:
    stats = image_stats(img)
    assert stats == pytest.approx({"brightness": 200 / 255, "contrast": 0.0, "sharpness": 0.0,
                                   "colourfulness": 0.0, "width": 9.0, "height": 6.0}, abs=1e-6)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4,), (0, 4, 3)], ids=["two-channels", "1-d", "empty"])
def test_bad_shapes_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="image"):
        image_stats(np.zeros(shape, np.uint8))


def test_batch_image_stats_stacks_rows_in_stat_names_order() -> None:
    images = [np.full((4, 6, 3), 0, np.uint8), _checkerboard(8, 1)]
    batch = batch_image_stats(images)
    assert batch.shape == (2, len(STAT_NAMES))
    np.testing.assert_allclose(batch[1], [image_stats(images[1])[name] for name in STAT_NAMES])
    np.testing.assert_allclose(batch[0], [0, 0, 0, 0, 6, 4])
    assert batch_image_stats([]).shape == (0, len(STAT_NAMES))


def _seeded_images() -> dict[str, Image.Image | np.ndarray]:
    """Images of different sizes, modes and dtypes, the same on every run."""
    rng = np.random.default_rng(7)

    def rgb(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    return {
        "rgb-24x40": Image.fromarray(rgb(24, 40)),
        "rgb-32x32": Image.fromarray(rgb(32, 32)),
        "grey-24x40": Image.fromarray(rgb(24, 40)).convert("L"),
        "rgba-9x17": Image.fromarray(rgb(9, 17)).convert("RGBA"),
        "palette-16x12": Image.fromarray(rgb(16, 12)).convert("P"),
        "tiny-2x2": Image.fromarray(rgb(2, 2)),
        "uint16-hw": rng.integers(0, 65536, (10, 14)).astype(np.uint16),
        "float-rgb": rng.random((12, 8, 3)).astype(np.float32),
    }


# What the former per-image implementation (one image at a time, np.dot variances) gave for _seeded_images();
# the stacked implementation must keep these numbers up to float32 summation order.
PER_IMAGE_RESULTS = {
    "rgb-24x40": [0.4988341016617293, 0.19009168052602496, 0.7046479585638457, 0.5540954558165138, 40.0, 24.0],
    "rgb-32x32": [0.5026937534730678, 0.19771961809706035, 0.7572119140625, 0.5277720764952514, 32.0, 32.0],
    "grey-24x40": [0.4978799285988013, 0.1930712161432181, 0.7835575085507626, 0.0, 40.0, 24.0],
    "rgba-9x17": [0.4894368124066615, 0.19383601178194135, 0.9484994797479539, 0.5450036688278148, 17.0, 9.0],
    "palette-16x12": [0.50482190574985, 0.22459302096330166, 1.0914738246372768, 0.5807865459618617, 12.0, 16.0],
    "tiny-2x2": [0.5311196520924568, 0.1456674813452198, 0.0, 0.469744387165087, 2.0, 2.0],
    "uint16-hw": [0.5186684317487691, 0.27582030627633297, 1.6162376403808594, 0.0, 14.0, 10.0],
    "float-rgb": [0.4933002726174891, 0.1984354151718877, 1.0065520604451497, 0.5221011574634147, 8.0, 12.0],
}


@pytest.mark.parametrize("name", list(PER_IMAGE_RESULTS), ids=list(PER_IMAGE_RESULTS))
def test_stats_match_the_former_per_image_results(name: str) -> None:
    image = _seeded_images()[name]
    np.testing.assert_allclose(batch_image_stats([image])[0], PER_IMAGE_RESULTS[name], rtol=1e-5, atol=1e-7)
    assert list(image_stats(image).values()) == pytest.approx(PER_IMAGE_RESULTS[name], rel=1e-5, abs=1e-7)


def test_a_mixed_batch_gives_each_image_its_own_numbers_in_order() -> None:
    images = _seeded_images()
    names = [*images, *images]  # every shape twice, interleaved: stacked groups must land back in input order
    batch = batch_image_stats([images[n] for n in names])
    np.testing.assert_allclose(batch, [PER_IMAGE_RESULTS[n] for n in names], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(batch[: len(images)], batch[len(images) :])


def test_stacks_of_many_same_size_images_match_single_images() -> None:
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(150)]
    singles = np.stack([batch_image_stats([im])[0] for im in images])  # 150 > one stacked pass: 3 chunks
    np.testing.assert_allclose(batch_image_stats(images), singles, rtol=1e-6, atol=1e-9)
