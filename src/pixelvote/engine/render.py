"""Pictures for people: image + heat map + mask contour, and the uncertainty map; and their encoded files."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

_LUT: np.ndarray | None = None

# record field -> (folder, suffix) of each per-image file. The overlay is only for people, so it is a JPEG:
# encoding it as PNG cost more than the whole forward pass of the offline ensemble (bench/speed.py).
OUTPUT_FILES = {"mask": ("masks", ".png"), "overlay": ("overlays", ".jpg"),
                "uncertainty": ("uncertainty", ".png")}
OVERLAY_JPEG_QUALITY = 90


def output_paths(key: str) -> dict[str, str]:
    """The manifest's relative paths of one image's files."""
    return {name: f"{folder}/{key}{suffix}" for name, (folder, suffix) in OUTPUT_FILES.items()}


def _lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        _LUT = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUT


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask (pixels of the mask with a 4-neighbour outside it)."""
    m = mask.astype(bool)
    inner = m.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def to_levels(maps: torch.Tensor) -> torch.Tensor:
    """Maps in [0, 1] -> uint8 levels 0..255 (rounded; 255 = 1.0 or more)."""
    return maps.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _levels(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """``image (H,W,3) uint8``, ``heat (H,W)`` (uint8 levels, or floats in [0,1]), ``mask (H,W) bool`` -> RGB
    uint8.

    numpy rather than PIL's faster-looking C loops: this runs in annotate's writer thread, and numpy releases
    the GIL in its loops while PIL's point/blend do not, which stalled the analysis (end to end 67 vs 51 ms
    per image in bench/speed.py)."""
    a = int(round(alpha * 256))
    out = image.astype(np.uint16)
    # the colour map pre-weighted, gathered with take (3x faster than fancy indexing)
    tinted = np.take(_lut().astype(np.uint16) * a, _levels(heat), axis=0)
    out *= 256 - a
    out += tinted
    out >>= 8
    out = out.astype(np.uint8)
    width = max(1, round(max(image.shape[:2]) / 300))
    out[contour(mask, width)] = (0, 255, 0)
    return out


def uncertainty_png(unc: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty (std of the CAM relative to its max; uint8 levels, or floats) -> uint8, 255 = 1.0
    or more."""
    return _levels(unc)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(array))
    if fmt == ".jpg":
        img.save(buf, format="JPEG", quality=OVERLAY_JPEG_QUALITY)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_outputs(image: np.ndarray, mask: np.ndarray, heat: np.ndarray,
                   unc: np.ndarray) -> dict[str, bytes]:
    """One image's files as bytes, by the record field that names them, in writing order: the mask (0/255
    PNG), the overlay (JPEG) and the uncertainty map (8-bit PNG). ``heat``/``unc``: uint8 levels or floats
    in [0, 1]."""
    arrays = {"mask": mask.astype(np.uint8) * np.uint8(255), "overlay": overlay(image, heat, mask),
              "uncertainty": uncertainty_png(unc)}
    return {name: _encode(arrays[name], OUTPUT_FILES[name][1]) for name in OUTPUT_FILES}
