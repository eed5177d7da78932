"""How a labelled image is stored: the model's own first step, a bounded size, PNG bytes, and a content id.

Images are stored as PNG bytes after the model's own first step (`to_rgb`) and, when their shorter side is
longer than ``max_short_side`` (default 256), downscaled to it with the resize the model's preprocessing
uses. Every catalog backbone resizes the shorter side to at most 256 px, so the stored image reproduces the
model input exactly (resize_size 256) or to within one further antialiased resize; a 12-megapixel upload
costs ~100 KB instead of ~20 MB. Pass ``max_short_side=None`` to keep the received pixels untouched.

An example's id hashes (adapter, pixels): the same image labelled twice (a corrected feedback, a re-upload, a
re-import) is one example.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from models.preprocessing import to_rgb

DEFAULT_MAX_SHORT_SIDE = 256


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
    """Lossless PNG bytes of an image (what the label store and the feedback input cache store)."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """The image of `encode_png` bytes, fully loaded (the bytes may be freed)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


def example_id(adapter: str, image: Image.Image) -> str:
    """Content id of a labelled example: the same pixels for the same adapter are the same example."""
    h = hashlib.blake2b(digest_size=16, person=b"adaptserve-label")
    h.update(f"{adapter}\0{image.mode}:{image.width}x{image.height}\0".encode())
    h.update(image.tobytes())
    return h.hexdigest()
