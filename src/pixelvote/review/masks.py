"""Mask uploads from the browser: strict checks (type, size in bytes, shape) and a canonical encoding.

An uploaded mask must be a PNG of exactly the image's width x height. A pixel is foreground when it is
bright (grey, or the brightest RGB channel, above 127) and opaque (alpha above 127, where there is an
alpha channel), so an opaque black-and-white PNG, a greyscale 0/255 PNG and a canvas export all work.
Stored masks are always 8-bit greyscale 0/255 PNGs (the format of ``OUT/masks``).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelvote.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16")


class MaskError(DataError):
    """An uploaded mask that cannot be used (the app answers 422 with the message)."""


def b64decode(text: str, *, max_bytes: int) -> bytes:
    """Decode base64 text (optionally a ``data:image/png;base64,`` URL), refusing more than ``max_bytes``."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise MaskError("mask_png: expected a base64 data URL (data:image/png;base64,...)")
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise MaskError(f"mask_png: expected at most {max_bytes} bytes of PNG but got more")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MaskError(f"mask_png: expected base64 text but it does not decode ({exc})") from exc


def decode_mask(data: bytes, width: int, height: int, *, max_bytes: int = 16 << 20) -> np.ndarray:
    """Check and decode an uploaded mask PNG to a ``(height, width) bool`` array.

    Raises :class:`MaskError` for anything but a readable PNG of exactly ``width`` x ``height``.
    """
    if len(data) > max_bytes:
        raise MaskError(f"mask_png: expected at most {max_bytes} bytes but got {len(data)}")
    if not data.startswith(PNG_SIGNATURE):
        raise MaskError("mask_png: expected a PNG image (it lacks the PNG signature)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG"])
            # the header alone tells the size: refuse a wrong one before decoding any pixel
            if img.size != (width, height):
                raise MaskError(
                    f"mask_png: expected a mask of {width}x{height} (the image's size) "
                    f"but got {img.size[0]}x{img.size[1]}"
                )
            if img.mode not in _MODES:
                raise MaskError(f"mask_png: expected a greyscale, RGB or RGBA PNG but got mode {img.mode!r}")
            img.load()
    except MaskError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MaskError(f"mask_png: expected a mask of {width}x{height} (the image's size) but got a far "
                        f"larger image ({exc})") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as exc:
        raise MaskError(f"mask_png: the PNG cannot be decoded ({exc})") from exc
    return _foreground(img)


def _foreground(img: Image.Image) -> np.ndarray:
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("I", "I;16"):
        arr = np.asarray(img).astype(np.int64)
        return arr > (127 if arr.max(initial=0) <= 255 else 32767)
    arr = np.asarray(img)
    if img.mode == "1":
        return arr.astype(bool)
    if arr.ndim == 2:
        return arr > 127
    bright = arr[..., :-1].max(axis=2) if img.mode in ("LA", "RGBA") else arr.max(axis=2)
    fg = bright > 127
    if img.mode in ("LA", "RGBA"):
        fg &= arr[..., -1] > 127
    return fg


def encode_mask(mask: np.ndarray) -> bytes:
    """A bool mask as the canonical 8-bit 0/255 greyscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)).save(
        buf, format="PNG", optimize=False, compress_level=6
    )
    return buf.getvalue()


def decode_stored(data: bytes) -> np.ndarray:
    """A stored 0/255 mask PNG as a bool array (trusted: written by :func:`encode_mask`)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 127
