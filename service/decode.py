"""Request input: untrusted bytes in, RGB PIL images (or a client error naming the problem) out.

Everything here runs on data a client sent, so every failure to decode is the client's problem and surfaces
as `InputError`, which the route layer turns into a 4xx JSON response ``{"error": str(err)}`` with
``err.status`` as the status code. Status policy:

- 400: malformed input: wrong JSON types, empty list, more images than allowed, invalid base64, empty data,
  bytes Pillow cannot identify or decode, truncated image data.
- 413: too large: image bytes over ``max_image_bytes``, pixel count over ``max_pixels`` (checked from the
  header before any pixel is decoded, so a decompression bomb costs a header read), and (route layer) a
  request body over its limit.

Decoding is done once: `Image.open` reads the header, the pixel limit is checked, `load()` decodes the first
frame (so truncated data fails here rather than later in the model transform), EXIF orientation is applied
in place and the image is converted to 8-bit RGB.

Pillow's process-wide guard (`Image.MAX_IMAGE_PIXELS`, default ~89 MP, error at twice that) is left as it
is: our own limit is checked first wherever the size is known, and Pillow's `DecompressionBombError` (raised
for images over twice its limit, and by plugins that grow the canvas while decoding) is turned into the same
413. A `max_pixels` above twice Pillow's limit therefore cannot take effect without raising
`Image.MAX_IMAGE_PIXELS` too. `ImageFile.LOAD_TRUNCATED_IMAGES` is not touched: truncated data is refused.
"""

from __future__ import annotations

import binascii
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models import settings
from models.preprocessing import to_rgb

__all__ = [
    "DecodeLimits",
    "InputError",
    "as_rgb",
    "decode_base64",
    "decode_images",
    "decode_one",
    "decode_upload",
    "open_image",
]

# Formats never opened from a request: EPS is rasterised by running Ghostscript on the data.
REFUSED_FORMATS = frozenset({"EPS"})

_PILLOW_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")  # in DecompressionBombError's message
_MAX_DETAIL = 200  # characters of a library's error message quoted back to the client


class InputError(ValueError):
    """Bad client input. `str(err)` is the message for the client; `status` the HTTP status (400 or 413).

    `index` names the failing element of a list of images (the message is then prefixed ``images[i]: ``);
    `detail` is the message without that prefix.
    """

    def __init__(self, detail: str, *, status: int = 400, index: int | None = None, field: str = "images") -> None:
        self.detail = detail
        self.status = status
        self.index = index
        self.field = field
        super().__init__(f"{field}[{index}]: {detail}" if index is not None else detail)

    @property
    def status_code(self) -> int:  # the name service/errors.py reads
        return self.status

    @property
    def message(self) -> str:
        return str(self)

    def at(self, index: int, field: str = "images") -> InputError:
        """The same error, naming element `index` of list `field`."""
        return InputError(self.detail, status=self.status, index=index, field=field)


@dataclass(frozen=True)
class DecodeLimits:
    """Per-request input limits (settings max_pixels, max_images, max_image_bytes); `from_env` reads them."""

    max_pixels: int = settings.default("max_pixels")
    max_images: int = settings.default("max_images")
    max_image_bytes: int = settings.default("max_image_bytes")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DecodeLimits:
        """Limits from ADAPTSERVE_MAX_PIXELS, ADAPTSERVE_MAX_IMAGES, ADAPTSERVE_MAX_IMAGE_BYTES (default os.environ).

        Unset or empty variables keep the default; anything but a positive integer (underscores allowed, as in
        ``40_000_000``) raises SettingsError naming the variable.
        """
        s = settings.load(environ)
        return cls(max_pixels=s.max_pixels, max_images=s.max_images, max_image_bytes=s.max_image_bytes)


# --- base64 ---------------------------------------------------------------------------------------------------

# delete whitespace, map the URL-safe alphabet onto the standard one
_B64_TABLE = bytes.maketrans(b"-_", b"+/")
_B64_WHITESPACE = b" \t\r\n\v\f"
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=_\-\s]", re.ASCII)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def decode_base64(s: str) -> bytes:
    """Base64 text to bytes: standard or URL-safe alphabet, padding optional, whitespace/newlines anywhere,
    optionally behind a ``data:<mediatype>;base64,`` prefix. Anything else raises InputError (400)."""
    if not isinstance(s, str):
        raise InputError(f"expected a base64 string, got {_type_name(s)}")
    start = len(s) - len(s.lstrip())
    if s[start : start + 5].lower() == "data:":
        comma = s.find(",", start)
        if comma < 0:
            raise InputError("data URL has no ',' before its data")
        header = s[start + 5 : comma]
        if not header.lower().endswith(";base64"):
            raise InputError(f"data URL is not base64-encoded (expected ';base64,', got {header[:60]!r})")
        start = comma + 1
    payload = s[start:]
    if not payload.isascii():
        raise _base64_alphabet_error(s, start)
    data = payload.encode("ascii").translate(_B64_TABLE, _B64_WHITESPACE).rstrip(b"=")
    if not data:
        raise InputError("empty string; expected base64-encoded image data")
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=True)
    except binascii.Error as e:
        if _NOT_B64.search(s, start):
            raise _base64_alphabet_error(s, start) from e
        raise InputError(f"invalid base64 ({e})") from e


def _base64_alphabet_error(s: str, start: int) -> InputError:
    bad = _NOT_B64.search(s, start)
    assert bad is not None
    return InputError(f"invalid base64 (character {bad.group()!r} at position {bad.start()} is not base64)")


# --- images -----------------------------------------------------------------------------------------------------


@cache
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so Image.ID is complete
    return tuple(f for f in Image.ID if f not in REFUSED_FORMATS)


def _too_many_pixels(size: tuple[int, int], limits: DecodeLimits) -> InputError:
    w, h = size
    return InputError(
        f"{w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels} ({settings.env_name('max_pixels')})",
        status=413,
    )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size an image's header claims, read as `Image.open` does but without Pillow's bomb check."""
    prefix = data[:16]
    for fmt in _formats():
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept is not None else True
            if not accepted or isinstance(accepted, str):  # a str is Pillow's "looks like it, but unsupported"
                continue
            return factory(io.BytesIO(data), "").size
        except Exception:  # any plugin failure means "not this format"
            continue
    return None


def _bomb_error(err: Exception, data: bytes, limits: DecodeLimits) -> InputError:
    size = _header_size(data)
    if size is not None and size[0] * size[1] > limits.max_pixels:
        return _too_many_pixels(size, limits)
    claimed = _PILLOW_BOMB_PIXELS.search(str(err))
    if size is None and claimed and int(claimed.group(1)) > limits.max_pixels:
        # a plugin that refuses while reading its header (WebP): only Pillow's pixel count is known
        pixels, env = claimed.group(1), settings.env_name("max_pixels")
        return InputError(f"image of {pixels} pixels exceeds the limit of {limits.max_pixels} ({env})", status=413)
    # The header is within our limit but Pillow refused anyway: its own limit is lower, or a plugin grew the
    # canvas while decoding (GIF frames larger than the logical screen).
    return InputError(f"refused as a possible decompression bomb ({_quote(err)})", status=413)


def _quote(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _decode_error(err: Exception) -> InputError:
    if "truncated" in str(err).lower() or isinstance(err, EOFError):
        return InputError("truncated image data")
    return InputError(f"not an image Pillow can decode ({_quote(err)})")


def open_image(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """Image bytes (any format Pillow reads, EPS excepted) to a fully decoded 8-bit RGB image.

    The byte size and the header's pixel count are checked before any pixel is decoded (413 when over the
    limits); undecodable or truncated data raises InputError (400). Animated and multi-page images give their
    first frame; EXIF orientation is applied.
    """
    limits = limits or DecodeLimits()
    if not data:
        raise InputError("empty image data")
    if len(data) > limits.max_image_bytes:
        raise InputError(
            f"image data of {len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes "
            f"({settings.env_name('max_image_bytes')})",
            status=413,
        )
    try:
        image = Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError as e:
        raise _bomb_error(e, data, limits) from e
    except UnidentifiedImageError as e:
        # Pillow's message quotes the file object's repr (a memory address); say it without that
        raise InputError("not an image Pillow can decode (cannot identify image file)") from e
    except MemoryError:
        raise
    except Exception as e:
        raise _decode_error(e) from e
    w, h = image.size
    if w * h > limits.max_pixels:
        raise _too_many_pixels(image.size, limits)
    if w < 1 or h < 1:
        raise InputError(f"image has no pixels ({w}x{h})")
    try:
        image.load()  # the first frame: Image.open leaves animated and multi-page images on frame 0
    except Image.DecompressionBombError as e:
        raise _bomb_error(e, data, limits) from e
    except MemoryError:
        raise
    except Exception as e:
        raise _decode_error(e) from e
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # orientation is best effort: an unreadable EXIF block leaves the image as stored
        pass
    try:
        return as_rgb(image)
    except MemoryError:
        raise
    except Exception as e:
        raise InputError(f"cannot convert {image.mode} image to RGB ({_quote(e)})") from e


def _scale_to_l(image: Image.Image) -> Image.Image:
    """Greyscale of any depth to 8-bit L, scaled by its maximum (as `to_rgb` does for I and I;16)."""
    arr = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(arr.max()) if arr.size else 0.0
    scale = 255.0 / top if top > 0 else 0.0
    return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")


def as_rgb(image: Image.Image) -> Image.Image:
    """`models.preprocessing.to_rgb`, plus the modes it does not cover: F and I;16N (scaled by their maximum
    rather than clipped), La and RGBa (premultiplied alpha, composited on white like RGBA)."""
    if image.mode in ("F", "I;16N"):
        image = _scale_to_l(image)
    elif image.mode == "La":
        image = image.convert("LA")
    elif image.mode == "RGBa":
        image = image.convert("RGBA")
    return to_rgb(image)


# --- request shapes ---------------------------------------------------------------------------------------------


def _check_count(n: int, limits: DecodeLimits, field: str) -> None:
    """At most `limits.max_images` images per request, whichever way they came (a JSON list, multipart parts)."""
    if n > limits.max_images:
        raise InputError(
            f"{field}: {n} images exceed the limit of {limits.max_images} per request "
            f"({settings.env_name('max_images')})"
        )


def decode_images(items: object, limits: DecodeLimits | None = None, *, field: str = "images") -> list[Image.Image]:
    """A JSON list of base64 strings to RGB images. Errors name the element (``images[2]: ...``).

    The list's type, length and element types are all checked before anything is decoded.
    """
    return decode_images_and_bytes(items, limits, field=field)[0]


def decode_images_and_bytes(
    items: object, limits: DecodeLimits | None = None, *, field: str = "images"
) -> tuple[list[Image.Image], list[bytes]]:
    """decode_images, plus the image file bytes each image came from (kept for feedback without a re-encode)."""
    limits = limits or DecodeLimits()
    if not isinstance(items, list | tuple):
        raise InputError(f"{field}: expected a list of base64 strings, got {_type_name(items)}")
    if not items:
        raise InputError(f"{field}: empty list; send at least one image")
    _check_count(len(items), limits, field)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(f"expected a base64 string, got {_type_name(item)}", index=i, field=field)
    images, blobs = [], []
    for i, item in enumerate(items):
        try:
            blobs.append(decode_base64(item))
            images.append(open_image(blobs[-1], limits))
        except InputError as e:
            raise e.at(i, field) from e.__cause__
    return images, blobs


def decode_one(item: object, limits: DecodeLimits | None = None, *, field: str = "image") -> Image.Image:
    """One base64 image (a JSON field, not a list); errors are prefixed with the field name (``image: ...``)."""
    if not isinstance(item, str):
        raise InputError(f"{field}: expected a base64 string, got {_type_name(item)}")
    try:
        return open_image(decode_base64(item), limits)
    except InputError as e:
        raise InputError(f"{field}: {e.detail}", status=e.status) from e.__cause__


def decode_uploads(
    items: list[bytes], limits: DecodeLimits | None = None, *, field: str = "file"
) -> list[Image.Image]:
    """Several upload bodies (multipart parts named `field`) to RGB images, under the same per-request image
    count as a JSON list; errors name the part (``file[1]: ...``)."""
    limits = limits or DecodeLimits()
    if not items:
        raise InputError(f"{field}: no file parts; send at least one image")
    _check_count(len(items), limits, field)
    images = []
    for i, data in enumerate(items):
        try:
            images.append(decode_upload(data, limits))
        except InputError as e:
            raise (e.at(i, field) if len(items) > 1 else e) from e.__cause__
    return images


def decode_upload(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """The body of a single-file upload (multipart file part) to an RGB image; errors carry no index."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(f"expected image file bytes, got {_type_name(data)}")
    if not data:
        raise InputError("empty upload; send an image file")
    return open_image(bytes(data), limits)
