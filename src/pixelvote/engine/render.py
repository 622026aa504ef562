"""Pictures for people: image + heat map + mask contour, and the uncertainty map; and their encoded files."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pixelvote.errors import ConfigError

_LUT: np.ndarray | None = None

# record field -> (folder, suffix) of each per-image file. The overlay is only for people, so it is a JPEG:
# encoding it as PNG cost more than the whole forward pass of the offline ensemble (bench/speed.py).
OUTPUT_FILES = {"mask": ("masks", ".png"), "overlay": ("overlays", ".jpg"),
                "uncertainty": ("uncertainty", ".png")}
OVERLAY_JPEG_QUALITY = 90
OVERLAY_ALPHA = 0.4  # the heat map's weight in the overlay


def opencv() -> Any:
    """The ``cv2`` module, which draws and encodes annotate's files, or a clear error where it cannot be
    imported (annotate checks this before it loads a model)."""
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError(f"OpenCV (cv2), which writes annotate's files, cannot be imported: {exc}",
                          fix="pip install --force-reinstall 'opencv-python-headless>=4.11'; if "
                              "opencv-python is installed too and lacks a system library such as libGL, "
                              "uninstall it") from exc
    if not hasattr(cv2, "IMWRITE_PNG_FILTER"):  # the PNG filter option came with OpenCV 4.11
        raise ConfigError(f"OpenCV {getattr(cv2, '__version__', '?')} is too old to write annotate's files",
                          fix="pip install --upgrade 'opencv-python-headless>=4.11'")
    return cv2


def _png_params(cv2: Any, mask: bool) -> list[int]:
    """PNGs at zlib level 1 with one fixed filter on every row rather than libpng's adaptive choice, and
    run-length matching: the two-valued masks unfiltered, the smooth maps (upsampled from the CAM's grid,
    so each row is close to the one above) with the "up" filter. On bench/speed.py's 40 real images that
    encodes an uncertainty map in 1.04 ms and 15 kB against 1.57 ms and 30 kB with the "sub" filter and
    plain matching, a mask in 0.41 ms and 0.5 kB against 0.54 ms and 1.2 kB. Both are plain 8-bit grey
    PNGs."""
    row_filter = cv2.IMWRITE_PNG_FILTER_NONE if mask else cv2.IMWRITE_PNG_FILTER_UP
    return [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, row_filter,
            cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


def output_paths(key: str) -> dict[str, str]:
    """The manifest's relative paths of one image's files."""
    return {name: f"{folder}/{key}{suffix}" for name, (folder, suffix) in OUTPUT_FILES.items()}


def _lut() -> np.ndarray:
    """The inferno colour map as a (256, 1, 3) BGR table, as OpenCV's ``applyColorMap`` takes it."""
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        rgb = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
        _LUT = np.ascontiguousarray(rgb[:, ::-1]).reshape(256, 1, 3)
    return _LUT


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask (pixels of the mask with a 4-neighbour outside it, ``width`` times;
    outside the image counts as outside the mask)."""
    cv2 = opencv()
    m = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = cv2.erode(m, cross, iterations=width, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return m.astype(bool) & (inner == 0)


def to_levels(maps: torch.Tensor) -> torch.Tensor:
    """Maps in [0, 1] -> uint8 levels 0..255 (rounded; 255 = 1.0 or more)."""
    return maps.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _levels(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _overlay_bgr(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """:func:`overlay` in OpenCV's BGR order, which ``imencode`` takes. OpenCV releases the GIL in its loops:
    this runs in annotate's writer thread beside the analysis."""
    cv2 = opencv()
    tinted = cv2.applyColorMap(np.ascontiguousarray(_levels(heat)), _lut())
    out = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 1.0 - alpha, tinted, alpha, 0.0)
    width = max(1, round(max(image.shape[:2]) / 300))
    out[contour(mask, width)] = (0, 255, 0)
    return out


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``image (H,W,3) uint8``, ``heat (H,W)`` (uint8 levels, or floats in [0,1]), ``mask (H,W) bool`` -> RGB
    uint8: the image blended with the heat map's colours, the mask's contour in green."""
    return np.ascontiguousarray(_overlay_bgr(np.ascontiguousarray(image), heat, mask, alpha)[..., ::-1])


def uncertainty_png(unc: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty (std of the CAM relative to its max; uint8 levels, or floats) -> uint8, 255 = 1.0
    or more."""
    return _levels(unc)


def _encode(array: np.ndarray, suffix: str, params: list[int]) -> bytes:
    ok, buf = opencv().imencode(suffix, array, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {array.shape} {array.dtype} array as {suffix}")
    return buf.tobytes()


def encode_outputs(image: np.ndarray, mask: np.ndarray, heat: np.ndarray,
                   unc: np.ndarray) -> dict[str, bytes]:
    """One image's files as bytes, by the record field that names them, in writing order: the mask (0/255
    8-bit PNG), the overlay (JPEG) and the uncertainty map (8-bit PNG). ``heat``/``unc``: uint8 levels or
    floats in [0, 1]."""
    cv2 = opencv()
    return {
        "mask": _encode(mask.astype(np.uint8) * np.uint8(255), ".png", _png_params(cv2, mask=True)),
        "overlay": _encode(_overlay_bgr(np.ascontiguousarray(image), heat, mask, OVERLAY_ALPHA), ".jpg",
                           [cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY]),
        "uncertainty": _encode(np.ascontiguousarray(uncertainty_png(unc)), ".png",
                               _png_params(cv2, mask=False)),
    }
