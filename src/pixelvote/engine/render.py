"""Pictures for people: image + heat map + mask contour, and the uncertainty map."""

from __future__ import annotations

import numpy as np

_LUT: np.ndarray | None = None


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


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """``image (H,W,3) uint8``, ``heat (H,W) in [0,1]``, ``mask (H,W) bool`` -> RGB uint8."""
    colours = _lut()[np.clip(heat * 255, 0, 255).astype(np.uint8)]
    out = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    width = max(1, round(max(image.shape[:2]) / 300))
    out[contour(mask, width)] = (0, 255, 0)
    return out


def uncertainty_png(unc: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty (std of the CAM relative to its max) -> uint8, 255 = 1.0 or more."""
    return np.clip(unc * 255.0 + 0.5, 0, 255).astype(np.uint8)
