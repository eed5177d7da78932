"""service.decode: request bytes to RGB images, or an InputError with the exact client message and status."""

from __future__ import annotations

import base64
import io
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from service.decode import (
    DecodeLimits,
    InputError,
    as_rgb,
    decode_base64,
    decode_images,
    decode_upload,
    open_image,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
W, H = 40, 30
# one sample pixel per quadrant, away from the edges so JPEG/WebP blocks do not blur them
TL, TR, BL, BR = (5, 5), (34, 5), (5, 24), (34, 24)


def quadrants(colors=(RED, GREEN, BLUE, WHITE), mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (W, H))
    for (x0, y0), color in zip(((0, 0), (W // 2, 0), (0, H // 2), (W // 2, H // 2)), colors, strict=True):
        image.paste(color, (x0, y0, x0 + W // 2, y0 + H // 2))
    return image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit PNG whose header claims width x height: a decompression bomb of a few hundred bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * 8)) + chunk(b"IEND", b"")


def webp_header_only(width: int, height: int) -> bytes:
    """The start of an extended WebP whose canvas is width x height (Pillow refuses it while reading the header)."""
    body = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def greyscale_array(left: float, right: float, dtype) -> np.ndarray:
    arr = np.full((H, W), left, dtype=dtype)
    arr[:, W // 2 :] = right
    return arr


def rgba_with_transparent_quadrant() -> Image.Image:
    image = quadrants(((255, 0, 0, 255), (0, 0, 0, 0), (0, 0, 255, 255), (0, 255, 0, 255)), mode="RGBA")
    return image


def animated(fmt: str, **kwargs) -> bytes:
    frames = [Image.new("RGB", (W, H), c) for c in (RED, BLUE, GREEN)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)


def palette_with_transparency() -> bytes:
    image = quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    index = image.getpixel(TR)  # make the green quadrant's palette entry transparent
    return encode(image, "PNG", transparency=index)


@dataclass(frozen=True)
class Format:
    make: Callable[[], bytes]
    pixels: dict[tuple[int, int], tuple[int, int, int]]
    tolerance: int = 0
    size: tuple[int, int] = (W, H)


QUADS = {TL: RED, TR: GREEN, BL: BLUE, BR: WHITE}
FORMATS = {
    "png-rgb": Format(lambda: encode(quadrants(), "PNG"), QUADS),
    "jpeg-rgb": Format(lambda: encode(quadrants(), "JPEG", quality=95), QUADS, tolerance=12),
    "jpeg-cmyk": Format(lambda: encode(quadrants().convert("CMYK"), "JPEG", quality=95), QUADS, tolerance=12),
    "jpeg-l": Format(
        lambda: encode(quadrants().convert("L"), "JPEG", quality=95),
        {TL: (76,) * 3, TR: (150,) * 3, BL: (29,) * 3, BR: WHITE},
        tolerance=6,
    ),
    "png-i16": Format(  # 16-bit greyscale scaled by its maximum, not clipped to white
        lambda: encode(Image.fromarray(greyscale_array(1000, 4000, np.uint16)), "PNG"),
        {TL: (63,) * 3, BR: WHITE},
    ),
    "tiff-i32": Format(
        lambda: encode(Image.fromarray(greyscale_array(0, 100_000, np.int32)), "TIFF"), {TL: BLACK, BR: WHITE}
    ),
    "tiff-float": Format(
        lambda: encode(Image.fromarray(greyscale_array(0.25, 1.0, np.float32)), "TIFF"),
        {TL: (63,) * 3, BR: WHITE},
    ),
    "png-rgba": Format(  # transparent pixels composite onto white
        lambda: encode(rgba_with_transparent_quadrant(), "PNG"), {TL: RED, TR: WHITE, BL: BLUE, BR: GREEN}
    ),
    "png-la": Format(
        lambda: encode(quadrants(((0, 255), (0, 0), (128, 255), (255, 255)), mode="LA"), "PNG"),
        {TL: BLACK, TR: WHITE, BL: (128,) * 3},
    ),
    "png-palette-transparency": Format(palette_with_transparency, {TL: RED, TR: WHITE, BL: BLUE, BR: WHITE}),
    "png-1bit": Format(lambda: encode(quadrants().convert("1"), "PNG"), {BL: BLACK, BR: WHITE}),
    "gif-animated-first-frame": Format(lambda: animated("GIF", duration=50, loop=0), {TL: RED, BR: RED}),
    "bmp": Format(lambda: encode(quadrants(), "BMP"), QUADS),
    "tiff": Format(lambda: encode(quadrants(), "TIFF"), QUADS),
    "tiff-lzw": Format(lambda: encode(quadrants(), "TIFF", compression="tiff_lzw"), QUADS),
    "tiff-multipage-first-page": Format(lambda: animated("TIFF"), {TL: RED, BR: RED}),
    "webp": Format(lambda: encode(quadrants(), "WEBP", quality=95), QUADS, tolerance=40),
    "webp-alpha": Format(
        lambda: encode(rgba_with_transparent_quadrant(), "WEBP", lossless=True),
        {TL: RED, TR: WHITE, BL: BLUE, BR: GREEN},
    ),
    "webp-animated-first-frame": Format(lambda: animated("WEBP", lossless=True, duration=50), {TL: RED, BR: RED}),
}


def assert_pixels(image: Image.Image, pixels: dict, tolerance: int = 0) -> None:
    for xy, expected in pixels.items():
        got = image.getpixel(xy)
        assert all(abs(g - e) <= tolerance for g, e in zip(got, expected, strict=True)), (xy, got, expected)


@pytest.mark.parametrize("case", FORMATS.values(), ids=FORMATS.keys())
def test_every_format_decodes_to_rgb_of_the_right_size(case: Format) -> None:
    data = case.make()
    for image in (open_image(data), decode_upload(data), decode_images([b64(data)])[0]):
        assert image.mode == "RGB"
        assert image.size == case.size
        assert_pixels(image, case.pixels, case.tolerance)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # red on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored left side ends up on top
    out = open_image(encode(image, "JPEG", quality=95, exif=exif))
    assert out.size == (20, 40)
    assert_pixels(out, {(10, 5): RED, (10, 34): BLUE}, tolerance=12)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("La", (128, 255), (128,) * 3),
        ("La", (0, 0), WHITE),
        ("RGBa", (255, 0, 0, 255), RED),
        ("RGBa", (0,) * 4, WHITE),
    ],
    ids=["La-opaque", "La-transparent", "RGBa-opaque", "RGBa-transparent"],
)
def test_as_rgb_premultiplied_modes(mode: str, value: tuple, expected: tuple) -> None:
    assert as_rgb(Image.new(mode, (2, 2), value)).getpixel((0, 0)) == expected


def test_as_rgb_float_ignores_nan_and_scales_by_max() -> None:
    arr = np.array([[np.nan, -1.0], [0.5, 2.0]], dtype=np.float32)
    out = np.asarray(as_rgb(Image.fromarray(arr)))[..., 0]
    assert out.tolist() == [[0, 0], [63, 255]]


# --- base64 --------------------------------------------------------------------------------------------------

RAW = bytes(range(256)) * 3  # every byte value: the standard encoding has '+' and '/', the URL-safe '-' and '_'
STD = base64.b64encode(RAW[:-1]).decode()  # 767 bytes, so the encoding ends in '='


@pytest.mark.parametrize(
    "text",
    [
        STD,
        STD.rstrip("="),
        base64.urlsafe_b64encode(RAW[:-1]).decode(),
        base64.urlsafe_b64encode(RAW[:-1]).decode().rstrip("="),
        "data:image/png;base64," + STD,
        "DATA:image/jpeg;BASE64," + STD,
        "data:;base64," + STD,
        base64.encodebytes(RAW[:-1]).decode(),  # MIME: a newline every 76 characters
        "\r\n  " + STD.replace("A", "A\r\n") + " \t\n",
        "  data:image/png;base64,\n" + base64.encodebytes(RAW[:-1]).decode().rstrip("=\n"),
    ],
    ids=[
        "standard",
        "no-padding",
        "url-safe",
        "url-safe-no-padding",
        "data-url",
        "data-url-uppercase",
        "data-url-no-mediatype",
        "mime-newlines",
        "crlf-and-spaces",
        "data-url-newlines-no-padding",
    ],
)
def test_base64_variants_decode(text: str) -> None:
    assert "+" in STD and "/" in STD and STD.endswith("=")
    assert decode_base64(text) == RAW[:-1]


def test_base64_variant_end_to_end() -> None:
    data = encode(quadrants(), "PNG")
    text = "data:image/png;base64," + base64.encodebytes(data).decode().replace("+", "-").replace("/", "_")
    (image,) = decode_images([text.rstrip("=\n")])
    assert_pixels(image, QUADS)


# --- errors ---------------------------------------------------------------------------------------------------

PNG = encode(quadrants(), "PNG")
JPEG = encode(quadrants(), "JPEG", quality=95)
NOISE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
GIF = encode(Image.frombytes("RGB", (W, H), NOISE[: W * H * 3]), "GIF")  # noise: the frame spans most of the file
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
UNDECODABLE = "not an image Pillow can decode (cannot identify image file)"
BOMB_MESSAGE = "20000x20000 = 400000000 pixels exceeds the limit of 40000000 (ADAPTSERVE_MAX_PIXELS)"


@dataclass(frozen=True)
class Bad:
    items: object
    message: str
    status: int = 400
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    index: int | None = 0


BAD_REQUESTS = {
    "invalid-base64-char": Bad(["abc!def"], "images[0]: invalid base64 (character '!' at position 3 is not base64)"),
    "invalid-base64-non-ascii": Bad(
        ["QUJD\u00e9RA=="], "images[0]: invalid base64 (character '\u00e9' at position 4 is not base64)"
    ),
    "invalid-base64-length": Bad(
        ["abcde"],
        "images[0]: invalid base64 (Invalid base64-encoded string: number of data characters (5) cannot be 1 more "
        "than a multiple of 4)",
    ),
    "invalid-base64-padding-inside": Bad(["ab=cd"], "images[0]: invalid base64 (Discontinuous padding not allowed)"),
    "data-url-not-base64": Bad(
        ["data:image/png,abcd"], "images[0]: data URL is not base64-encoded (expected ';base64,', got 'image/png')"
    ),
    "data-url-no-comma": Bad(["data:image/png;base64"], "images[0]: data URL has no ',' before its data"),
    "empty-string": Bad([""], "images[0]: empty string; expected base64-encoded image data"),
    "whitespace-only": Bad([" \n\t"], "images[0]: empty string; expected base64-encoded image data"),
    "random-bytes": Bad([b64(NOISE)], f"images[0]: {UNDECODABLE}"),
    "text-not-image": Bad([b64(b"hello, this is not an image\n" * 20)], f"images[0]: {UNDECODABLE}"),
    "eps-refused": Bad([b64(EPS)], f"images[0]: {UNDECODABLE}"),
    "truncated-png": Bad([b64(PNG), b64(PNG[: len(PNG) // 2])], "images[1]: truncated image data", index=1),
    "truncated-jpeg": Bad([b64(JPEG[: len(JPEG) * 2 // 3])], "images[0]: truncated image data"),
    "truncated-jpeg-header": Bad([b64(JPEG[:300])], "images[0]: truncated image data"),
    "truncated-gif": Bad([b64(GIF[: len(GIF) // 2])], "images[0]: truncated image data"),
    "decompression-bomb": Bad([b64(png_header_only(20_000, 20_000))], f"images[0]: {BOMB_MESSAGE}", 413),
    "decompression-bomb-webp": Bad(
        [b64(webp_header_only(16383, 16383))],
        "images[0]: image of 268402689 pixels exceeds the limit of 40000000 (ADAPTSERVE_MAX_PIXELS)",
        413,
    ),
    "over-our-limit-under-pillows": Bad(
        [b64(PNG), b64(PNG), b64(png_header_only(8000, 6000))],
        "images[2]: 8000x6000 = 48000000 pixels exceeds the limit of 40000000 (ADAPTSERVE_MAX_PIXELS)",
        413,
        index=2,
    ),
    "over-configured-pixel-limit": Bad(
        [b64(PNG)],
        "images[0]: 40x30 = 1200 pixels exceeds the limit of 1000 (ADAPTSERVE_MAX_PIXELS)",
        413,
        DecodeLimits(max_pixels=1000),
    ),
    "oversized-image-bytes": Bad(
        [b64(b"\x89PNG" + bytes(196))],
        "images[0]: image data of 200 bytes exceeds the limit of 100 bytes (ADAPTSERVE_MAX_IMAGE_BYTES)",
        413,
        DecodeLimits(max_image_bytes=100),
    ),
    "not-a-list-int": Bad(5, "images: expected a list of base64 strings, got int", index=None),
    "not-a-list-null": Bad(None, "images: expected a list of base64 strings, got null", index=None),
    "not-a-list-dict": Bad({"a": b64(PNG)}, "images: expected a list of base64 strings, got dict", index=None),
    "not-a-list-str": Bad(b64(PNG), "images: expected a list of base64 strings, got str", index=None),
    "list-of-ints": Bad([1, 2], "images[0]: expected a base64 string, got int"),
    "list-with-null": Bad([b64(PNG), None], "images[1]: expected a base64 string, got null", index=1),
    "list-with-list": Bad([[b64(PNG)]], "images[0]: expected a base64 string, got list"),
    "types-checked-before-decoding": Bad(["!!!", {}], "images[1]: expected a base64 string, got dict", index=1),
    "empty-list": Bad([], "images: empty list; send at least one image", index=None),
    "too-many-images": Bad(
        ["x"] * 40, "images: 40 images exceed the limit of 32 per request (ADAPTSERVE_MAX_IMAGES)", index=None
    ),
    "too-many-images-configured": Bad(
        [b64(PNG)] * 3,
        "images: 3 images exceed the limit of 2 per request (ADAPTSERVE_MAX_IMAGES)",
        limits=DecodeLimits(max_images=2),
        index=None,
    ),
}


@pytest.mark.parametrize("bad", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_give_input_error(bad: Bad) -> None:
    with pytest.raises(InputError) as info:
        decode_images(bad.items, bad.limits)
    assert str(info.value) == bad.message
    assert info.value.status == bad.status
    assert info.value.index == bad.index
    assert isinstance(info.value, ValueError)


BAD_UPLOADS = {
    "empty": (b"", "empty upload; send an image file", 400),
    "random-bytes": (NOISE, UNDECODABLE, 400),
    "truncated-png": (PNG[:-40], "truncated image data", 400),
    "decompression-bomb": (png_header_only(20_000, 20_000), BOMB_MESSAGE, 413),
    "not-bytes": ("hello", "expected image file bytes, got str", 400),
}


@pytest.mark.parametrize(("data", "message", "status"), BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_uploads_give_input_error_without_index(data: object, message: str, status: int) -> None:
    with pytest.raises(InputError) as info:
        decode_upload(data)  # type: ignore[arg-type]
    assert (str(info.value), info.value.status, info.value.index) == (message, status, None)


def test_upload_accepts_bytearray() -> None:
    assert decode_upload(bytearray(PNG)).size == (W, H)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = png_header_only(20_000, 20_000)
    assert len(bomb) < 20_000
    start = time.perf_counter()
    with pytest.raises(InputError, match="20000x20000"):
        open_image(bomb)
    assert time.perf_counter() - start < 0.5


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF tags it skips
def test_mutated_images_never_raise_anything_but_input_error() -> None:
    """Truncations and byte flips of every format: an image or an InputError, never another exception."""
    rng = np.random.default_rng(1)
    sources = [FORMATS[k].make() for k in ("png-rgb", "jpeg-rgb", "gif-animated-first-frame", "tiff", "webp", "bmp")]
    outcomes = {"ok": 0, "error": 0}
    for data in sources:
        for _ in range(25):
            mutated = bytearray(data[: int(rng.integers(1, len(data) + 1))])
            for pos in rng.integers(0, len(mutated), size=int(rng.integers(0, 4))):
                mutated[pos] = int(rng.integers(0, 256))
            try:
                image = decode_upload(bytes(mutated))
            except InputError as e:
                assert e.status in (400, 413)
                outcomes["error"] += 1
            else:
                assert image.mode == "RGB"
                outcomes["ok"] += 1
    assert outcomes["error"] > 0


def test_large_jpeg_decodes_once_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    small = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR)
    data = encode(photo, "JPEG", quality=90)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    start = time.perf_counter()
    image = open_image(data)
    elapsed = time.perf_counter() - start
    assert image.size == (4000, 3000) and image.mode == "RGB"
    assert len(opened) == 1
    assert elapsed < 1.0


# --- limits ---------------------------------------------------------------------------------------------------

ENV = ("ADAPTSERVE_MAX_PIXELS", "ADAPTSERVE_MAX_IMAGES", "ADAPTSERVE_MAX_IMAGE_BYTES")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, DecodeLimits(40_000_000, 32, 20 * 2**20)),
        ({"ADAPTSERVE_MAX_PIXELS": "1000000"}, DecodeLimits(max_pixels=1_000_000)),
        (
            {
                "ADAPTSERVE_MAX_PIXELS": "50_000_000",
                "ADAPTSERVE_MAX_IMAGES": " 8 ",
                "ADAPTSERVE_MAX_IMAGE_BYTES": "1024",
            },
            DecodeLimits(50_000_000, 8, 1024),
        ),
        ({"ADAPTSERVE_MAX_IMAGES": ""}, DecodeLimits()),
    ],
    ids=["unset", "pixels", "all-three", "empty-is-default"],
)
def test_limits_from_env(clean_env: pytest.MonkeyPatch, env: dict[str, str], expected: DecodeLimits) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert DecodeLimits.from_env() == expected


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("ADAPTSERVE_MAX_PIXELS", "40MP", "is not an integer"),
        ("ADAPTSERVE_MAX_PIXELS", "1.5", "is not an integer"),
        ("ADAPTSERVE_MAX_IMAGES", "0", "must be >= 1"),
        ("ADAPTSERVE_MAX_IMAGES", "-3", "must be >= 1"),
        ("ADAPTSERVE_MAX_IMAGE_BYTES", "lots", "is not an integer"),
    ],
    ids=["pixels-unit", "pixels-float", "images-zero", "images-negative", "bytes-word"],
)
def test_limits_from_env_rejects_bad_values(
    clean_env: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^{name}='{re.escape(value)}' {problem} \(default \d+\)$"):
        DecodeLimits.from_env()


def test_limits_validate_directly() -> None:
    with pytest.raises(ValueError, match="max_images must be a positive integer"):
        DecodeLimits(max_images=0)
    assert DecodeLimits.from_env({"ADAPTSERVE_MAX_IMAGES": "4"}).max_images == 4


def test_input_error_defaults() -> None:
    err = InputError("bad")
    assert (str(err), err.status, err.index, err.detail) == ("bad", 400, None, "bad")
    moved = InputError("too big", status=413).at(3)
    assert (str(moved), moved.status, moved.index, moved.detail) == ("images[3]: too big", 413, 3, "too big")
