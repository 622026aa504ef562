"""Reading images and masks of any common kind, and writing outputs atomically.

Everything a user may hand us (PNG/JPEG/BMP/TIFF, 8/16-bit, grey, palette, RGB, RGBA, CMYK, EXIF-rotated)
comes out as an RGB ``uint8`` array *as displayed*, so masks line up with what people see.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelvote.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Refuse images larger than this many pixels before decoding them (a decompression bomb or a typo).
MAX_PIXELS = 16_384 * 16_384


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 Mpx; MAX_PIXELS below is the limit (PIL still refuses > 179 Mpx itself)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(
                    f"image is {w}x{h} pixels, over pixelvote's limit of {MAX_PIXELS} pixels",
                    path=path,
                    fix="downscale it, or raise pixelvote.data.imageio.MAX_PIXELS if it is genuine",
                )
            img.load()
            return img
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image is too large to decode safely ({exc})", path=path,
                        fix="downscale it before annotating") from exc
    except FileNotFoundError as exc:
        raise DataError("file not found", path=path, fix="check the path") from exc
    except UnidentifiedImageError as exc:
        raise DataError("not a readable image (unknown or corrupt format)", path=path,
                        fix="re-export it as PNG or JPEG, or remove it from the folder") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image could not be decoded ({exc})", path=path,
                        fix="the file is probably truncated or corrupt: re-export or remove it") from exc


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth or float image to 0..255 by its own value range (X-rays use 10-16 bits)."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _grey_to_rgb(arr: np.ndarray) -> np.ndarray:
    """``(H, W) uint8`` -> ``(H, W, 3)``: OpenCV's copy, 2-5x faster than ``np.repeat``."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_GRAY2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as displayed: ``(H, W, 3) uint8`` RGB. Raises :class:`DataError` naming the file."""
    path = Path(path)
    img = _open(path)
    try:
        ImageOps.exif_transpose(img, in_place=True)  # not a copy of every image that needs no turning
    except Exception:  # a broken EXIF block should not cost the image
        pass
    mode = img.mode
    if mode in ("RGB", "L"):
        arr = np.asarray(img)
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
        # transparent pixels composited onto black, like most viewers show medical images
        arr = (rgba[..., :3] * (rgba[..., 3:4] / 255.0) + 0.5).astype(np.uint8)
    elif mode in ("P", "CMYK", "YCbCr", "1", "HSV", "LAB"):
        arr = np.asarray(img.convert("RGB"))
    elif mode.startswith("I") or mode == "F":
        arr = _to_uint8(np.asarray(img))
    else:
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 2:
        arr = _grey_to_rgb(_to_uint8(arr))
    elif arr.ndim == 3 and arr.shape[2] != 3:
        arr = arr[..., :3]
    return np.ascontiguousarray(_to_uint8(arr))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), read from the header."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
    except Image.DecompressionBombError as exc:
        raise DataError(f"image is too large to decode safely ({exc})", path=path,
                        fix="downscale it before annotating") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"not a readable image ({exc})", path=path, fix="re-export or remove it") from exc
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as ``(H, W) bool`` (any non-zero pixel is foreground).

    ``size`` is the image's ``(width, height)``; a mask of another size is an error, not resized.
    """
    path = Path(path)
    img = _open(path)
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass
    if size is not None and img.size != tuple(size):
        raise DataError(
            f"mask is {img.size[0]}x{img.size[1]} but its image is {size[0]}x{size[1]}",
            path=path,
            fix="masks must have exactly their image's size; re-export the mask at the image's size",
        )
    arr = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I", "I;16", "F") else img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs get the permissions a plain open() would give them
_FILE_MODE = 0o666 & ~_read_umask()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut cannot undo it); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write a file so that readers see either the old file or the whole new one, never a part.

    ``durable=False`` skips the fsyncs: the file is still replaced atomically (a killed process never leaves
    a partial file), and the caller makes it durable later, e.g. with one ``os.sync()`` for a whole batch."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fh.fileno(), _FILE_MODE)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_png_atomic(path: str | Path, array: np.ndarray, *, durable: bool = True) -> None:
    """Save a ``uint8`` array (H, W) or (H, W, 3) as PNG, atomically."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    write_bytes_atomic(path, buf.getvalue(), durable=durable)


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """An output folder must be a folder or not exist yet, with no file on the way to it: checked before
    any work is done, so that none is lost when the results are written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} is a file, not a folder", path=path,
                          fix=f"pass a folder (new or existing) as {option}")
    blocker = file_above(path)
    if blocker is not None:
        raise ConfigError(f"{option} lies inside {blocker}, which is a file, not a folder", path=path,
                          fix=f"pass a folder (new or existing) as {option}")
    return path


def file_above(path: str | Path) -> Path | None:
    """The nearest existing folder above ``path`` when it is a file (so nothing can be made there), else
    None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def append_jsonl(path: str | Path, record: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Append one record (or several) as one line each and make them durable (the manifest is append-only)."""
    recs = record if isinstance(record, list) else [record]
    line = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and not line.endswith("\n"):
                return  # torn tail
            raise DataError(f"line {i + 1} is not valid JSON ({exc})", path=path,
                            fix="remove or repair that line") from exc


def repair_jsonl_tail(path: str | Path) -> None:
    """Cut a torn last line off a JSON-lines file so that the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        fh.truncate(cut)
