"""models.preprocessing: colour modes to RGB, eval/train transforms, presets from torchvision weights, parsing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from models.preprocessing import Preprocessing, parse_augment, to_rgb


def _px(image: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


# ------------------------------------------------------------------------------------------ to_rgb


def _la() -> Image.Image:
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (40, 0))  # transparent
    im.putpixel((1, 0), (40, 255))  # opaque
    return im


def _rgba() -> Image.Image:
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white
    im.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    im.putpixel((2, 0), (0, 0, 0, 128))  # half black over white -> mid grey
    return im


def _palette(transparent: bool) -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    if transparent:
        im.info["transparency"] = 0
    return im


def _cmyk() -> Image.Image:
    im = Image.new("CMYK", (3, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))  # no ink -> white
    im.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    im.putpixel((2, 0), (0, 0, 0, 255))  # full black
    return im


def _i16_ramp() -> Image.Image:
    im = Image.fromarray(np.array([[0, 1000, 2000, 4000]], dtype=np.uint16))
    assert im.mode == "I;16"
    return im


def _bilevel() -> Image.Image:
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    return im


@pytest.mark.parametrize(
    "make, expected",
    [
        pytest.param(lambda: Image.new("L", (2, 1), 77), [(77, 77, 77), (77, 77, 77)], id="L"),
        pytest.param(_la, [(255, 255, 255), (40, 40, 40)], id="LA-transparent-white"),
        pytest.param(_rgba, [(255, 255, 255), (10, 20, 30), (127, 127, 127)], id="RGBA-transparent-white"),
        pytest.param(lambda: _palette(False), [(255, 0, 0), (0, 0, 255)], id="P"),
        pytest.param(lambda: _palette(True), [(255, 255, 255), (0, 0, 255)], id="P-with-transparency"),
        pytest.param(_cmyk, [(255, 255, 255), (0, 255, 255), (0, 0, 0)], id="CMYK"),
        pytest.param(_i16_ramp, [(0, 0, 0), (63, 63, 63), (127, 127, 127), (255, 255, 255)], id="I;16-ramp"),
        pytest.param(
            lambda: Image.fromarray(np.zeros((1, 2), np.uint16)), [(0, 0, 0), (0, 0, 0)], id="I;16-all-black"
        ),
        pytest.param(_bilevel, [(0, 0, 0), (255, 255, 255)], id="1"),
        pytest.param(lambda: Image.new("RGB", (1, 1), (1, 2, 3)), [(1, 2, 3)], id="RGB"),
    ],
)
def test_to_rgb(make, expected):
    image = make()
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.size == image.size
    got = [_px(out, (x, 0)) for x in range(out.width)]
    for g, e in zip(got, expected, strict=True):
        assert max(abs(a - b) for a, b in zip(g, e, strict=True)) <= 1, (got, expected)


def test_to_rgb_keeps_rgb_images_as_they_are():
    im = Image.new("RGB", (4, 4), (9, 8, 7))
    assert to_rgb(im) is im


def test_to_rgb_16_bit_maps_its_maximum_to_white_not_clipping():
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    out = np.asarray(to_rgb(Image.fromarray(arr)))[..., 0]
    assert out[0, 0] == 0 and out[7, 7] == 255
    assert (np.diff(out.ravel().astype(int)) >= 0).all(), "the ramp stays monotone"
    assert len(np.unique(out)) == 64, "no two ramp steps collapse (clipping at 255 would merge 63 of them)"


# ------------------------------------------------------------------------------------------ eval_transform

MODES = ["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1"]
SIZES = [(8, 8), (64, 16), (16, 64), (33, 9), (40, 40)]


def _image(mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    rgb[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    im = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 200)
    if mode == "P":
        return im.quantize(8)
    return im.convert(mode)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("mode", MODES, ids=MODES)
def test_eval_transform_shape_and_dtype(mode, size):
    prep = Preprocessing(crop_size=16, resize_size=20)
    x = prep.eval_transform()(_image(mode, size))
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, 16, 16)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "mean, std, colour",
    [
        pytest.param((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (255, 128, 0), id="imagenet"),
        pytest.param((0.5, 0.25, 0.1), (0.5, 0.25, 0.2), (51, 102, 204), id="custom"),
        pytest.param((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (10, 20, 30), id="identity"),
    ],
)
def test_eval_transform_normalises_with_the_given_mean_and_std(mean, std, colour):
    prep = Preprocessing(crop_size=8, resize_size=12, mean=mean, std=std)
    x = prep.eval_transform()(Image.new("RGB", (20, 10), colour))
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, mean, std, strict=True)]
    for channel in range(3):
        assert torch.allclose(x[channel], torch.full((8, 8), expected[channel]), atol=1e-5), channel


def test_eval_transform_centre_crops_after_resizing_the_shorter_side():
    # 40x20 image: left half black, right half white; resize shorter side to 10 -> 20x10, centre crop 10 -> the
    # middle, so the crop's left half is black and its right half white
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    prep = Preprocessing(crop_size=10, resize_size=10, mean=(0, 0, 0), std=(1, 1, 1))
    x = prep.eval_transform()(Image.fromarray(arr))
    assert x.shape == (3, 10, 10)
    assert x[:, :, :4].max() < 0.05 and x[:, :, 6:].min() > 0.95


# ------------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    "weights, crop, resize",
    [
        pytest.param(torchvision.models.ResNet18_Weights.DEFAULT, 224, 256, id="resnet18"),
        pytest.param(torchvision.models.Inception_V3_Weights.DEFAULT, 299, 342, id="inception_v3"),
    ],
)
def test_from_weights_reads_the_preset(weights, crop, resize):
    prep = Preprocessing.from_weights(weights)
    assert (prep.crop_size, prep.resize_size) == (crop, resize)
    assert prep.mean == pytest.approx((0.485, 0.456, 0.406))
    assert prep.std == pytest.approx((0.229, 0.224, 0.225))
    assert isinstance(prep.mean, tuple) and isinstance(prep.std, tuple)


@pytest.mark.parametrize(
    "prep",
    [
        pytest.param(Preprocessing(), id="default"),
        pytest.param(Preprocessing.for_size(32), id="for-size-32"),
        pytest.param(Preprocessing(96, 110, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), id="custom"),
    ],
)
def test_to_dict_from_dict_round_trip(prep):
    d = prep.to_dict()
    assert set(d) == {"crop_size", "resize_size", "mean", "std"}
    assert Preprocessing.from_dict(d) == prep
    via_json = Preprocessing.from_dict(json.loads(json.dumps(d)))  # lists come back from JSON
    assert via_json == prep
    assert isinstance(via_json.mean, tuple)


def test_for_size_has_no_crop_margin():
    prep = Preprocessing.for_size(32)
    assert (prep.crop_size, prep.resize_size) == (32, 32)
    assert prep.eval_transform()(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "crop, resize",
    [
        pytest.param(7, 7, id="crop-below-8"),
        pytest.param(0, 10, id="crop-zero"),
        pytest.param(32, 31, id="resize-below-crop"),
    ],
)
def test_post_init_errors(crop, resize):
    message = f"preprocessing needs crop_size >= 8 and resize_size >= crop_size, got crop {crop}, resize {resize}"
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        Preprocessing(crop_size=crop, resize_size=resize)
    assert str(err.value) == message


def test_post_init_accepts_the_smallest_valid_sizes():
    assert Preprocessing(crop_size=8, resize_size=8).to_dict()["crop_size"] == 8


# ------------------------------------------------------------------------------------------ parse_augment


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("none", (), id="preset-none"),
        pytest.param("light", ("crop", "rotate"), id="preset-light"),
        pytest.param("standard", ("crop", "rotate", "flip", "jitter"), id="preset-standard"),
        pytest.param("flip", ("flip",), id="single"),
        pytest.param("jitter, crop", ("jitter", "crop"), id="list-with-space"),
        pytest.param("crop,,rotate,", ("crop", "rotate"), id="empty-items-dropped"),
        pytest.param("", (), id="empty-string"),
    ],
)
def test_parse_augment(value, expected):
    assert parse_augment(value) == expected


@pytest.mark.parametrize(
    "value, unknown",
    [
        pytest.param("blur", "blur", id="unknown-single"),
        pytest.param("crop,blur,sharpen", "blur, sharpen", id="two-unknown-in-list"),
        pytest.param("Standard", "Standard", id="preset-is-case-sensitive"),
        pytest.param("light,flip", "light", id="preset-inside-list"),
    ],
)
def test_parse_augment_unknown(value, unknown):
    message = (
        f"unknown augmentation {unknown}; use a preset (none, light, standard) or a comma list of crop, rotate, "
        "flip, jitter"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_augment(value)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------ train_transform

AUGMENTS = [
    pytest.param((), id="none"),
    pytest.param(("crop",), id="crop"),
    pytest.param(("rotate",), id="rotate"),
    pytest.param(("flip",), id="flip"),
    pytest.param(("jitter",), id="jitter"),
    pytest.param(("crop", "rotate", "flip", "jitter"), id="all"),
]


def _photo(size=(48, 32)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("augment", AUGMENTS)
def test_train_transform_shape_and_reproducibility(augment):
    prep = Preprocessing(crop_size=24, resize_size=28)
    transform = prep.train_transform(augment)
    image = _photo()
    torch.manual_seed(123)
    a = transform(image)
    torch.manual_seed(123)
    b = transform(image)
    assert a.dtype == torch.float32 and tuple(a.shape) == (3, 24, 24)
    assert torch.equal(a, b)
    for mode in ("L", "RGBA", "CMYK"):
        assert tuple(transform(image.convert(mode)).shape) == (3, 24, 24)


@pytest.mark.parametrize("augment", [a for a in AUGMENTS if a.values[0]])
def test_train_transform_augmentations_are_random(augment):
    transform = Preprocessing(crop_size=24, resize_size=28).train_transform(augment)
    image = _photo((40, 40))
    torch.manual_seed(0)
    outs = {transform(image).numpy().tobytes() for _ in range(6)}
    assert len(outs) > 1


def test_train_transform_without_augmentation_equals_eval_transform():
    prep = Preprocessing(crop_size=24, resize_size=28)
    image = _photo((50, 30))
    assert torch.equal(prep.train_transform(())(image), prep.eval_transform()(image))


@pytest.mark.parametrize("size", [pytest.param((48, 32), id="3:2"), pytest.param((64, 36), id="16:9")])
def test_crop_augmentation_is_random_for_wide_images(size):
    transform = Preprocessing(crop_size=24, resize_size=28).train_transform(("crop",))
    image = _photo(size)
    torch.manual_seed(0)
    assert len({transform(image).numpy().tobytes() for _ in range(8)}) > 1
