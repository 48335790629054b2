"""Open an image source safely: the bytes or path media.py resolved -> a PIL image, upright.

Owns: the safe list of Pillow formats (no EPS/Ghostscript), the decompression-bomb guard
(`PIL.Image.MAX_IMAGE_PIXELS`, checked from the header before decoding), Pillow's errors as ValueErrors
naming the item, and the EXIF orientation (`upright`, `upright_size`). Where a source may come from is
media.py's business (fetch_bytes under the MediaPolicy); resizing is image.py's.
"""
from __future__ import annotations

import contextlib
import io
import re
import struct
from typing import Any

from PIL import Image

from qvl.multimodal.media import MediaPolicy, _fail, _short, fetch_bytes

SAFE_IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA",
                      "JPEG2000", "AVIF", "QOI", "PCX", "SGI", "DDS")


def _image_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in SAFE_IMAGE_FORMATS if f in Image.OPEN)


def open_image(source: Any, *, policy: MediaPolicy | None = None, label: str = "image",
               load: bool = True) -> Image.Image:
    """Open an image source. load=False reads only the header (size, mode) for token counting; its
    upright size is `upright_size(img)`. load=True applies the EXIF orientation (`upright`), for every kind
    of source, a PIL image included (a new image then; the caller's is left alone).

    The returned image keeps its original mode; callers convert to RGB.
    """
    if isinstance(source, Image.Image):
        return upright(source) if load else source
    if _is_ndarray(source):
        try:
            return Image.fromarray(source)
        except (TypeError, ValueError) as e:
            raise _fail(label, f"cannot make an image from array of shape {source.shape} and dtype "
                               f"{source.dtype} ({e})") from None
    data = fetch_bytes(source, policy=policy, label=label)
    with _pil_errors(label, data):
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=_image_formats())
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    problem = None
    if limit is not None and w * h > limit:
        problem = (f"decompression-bomb guard: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
                   "pixels (PIL.Image.MAX_IMAGE_PIXELS)")
    elif w == 0 or h == 0:
        problem = f"image has zero size ({w}x{h})"
    if problem:
        img.close()
        raise _fail(label, problem)
    if load:
        with _pil_errors(label, data):
            img.load()
            out = upright(img)
        if out is not img:
            img.close()
        return out
    return img


_SWAPS_SIDES = (5, 6, 7, 8)      # EXIF orientations that turn the image by 90 degrees


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError, SyntaxError):   # a broken EXIF block: as stored
        return 1


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (transformers' load_image does it
    with ImageOps.exif_transpose), or the image itself when it has none. Pixel coordinates (grounding
    boxes) are the upright image's."""
    if _orientation(img) == 1:
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the upright image, from the header (nothing decoded)."""
    w, h = img.size
    return (h, w) if _orientation(img) in _SWAPS_SIDES else (w, h)


@contextlib.contextmanager
def _pil_errors(label: str, data: bytes | str):
    """Pillow's exceptions -> ValueError naming the item."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        got, lim = (m.group(1), m.group(2)) if m else ("?", str(Image.MAX_IMAGE_PIXELS))
        raise _fail(label, f"decompression-bomb guard: {got} pixels exceeds the limit of {lim} pixels "
                           "(PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Image.UnidentifiedImageError:
        what = f"{len(data)} bytes" if isinstance(data, bytes) else repr(_short(data))
        raise _fail(label, f"not a recognised image ({what}; formats tried: "
                           f"{', '.join(_image_formats())})") from None
    except (OSError, SyntaxError, EOFError, ValueError, struct.error, MemoryError) as e:
        raise _fail(label, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def _is_ndarray(x: Any) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"
