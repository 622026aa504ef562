"""A small deterministic synthetic dataset with ground-truth masks, for the demo and tests.

Images look loosely like ultrasound: smooth speckled texture; a "lesion" is a darker blob with a brighter
rim and an irregular outline. ``normal`` images have texture only (and sometimes a faint harmless
structure, so the task is not trivially 'any dark spot')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    base = gaussian_filter(rng.random((h, w)), sigma=rng.uniform(2.0, 4.0))
    base = (base - base.min()) / (np.ptp(base) + 1e-8)
    speckle = rng.gamma(4.0, 0.25, (h, w))
    grad = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.8), h)[:, None]
    return np.clip((0.45 + 0.35 * base) * speckle * grad, 0, 1.5)


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.08, 0.2) * w
    yy, xx = np.mgrid[0:h, 0:w]
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6.28)) + 0.08 * np.sin(5 * ang + rng.uniform(0, 6.28))
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) / wobble
    return r


def make_image(rng: np.random.Generator, lesion: bool,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    img = _texture(rng, h, w)
    mask = np.zeros((h, w), bool)
    if lesion:
        r = _blob(rng, h, w)
        mask = r <= 1.0
        img = np.where(mask, img * 0.3, img)
        rim = (r > 1.0) & (r < 1.25)
        img = np.where(rim, np.clip(img * 1.5 + 0.15, 0, 1.5), img)
    elif rng.random() < 0.5:  # a faint bright streak, not a lesion
        r = _blob(rng, h, w)
        img = np.where(r < 0.6, np.clip(img * 1.3, 0, 1.5), img)
    out = (np.clip(img / 1.5, 0, 1) * 255).astype(np.uint8)
    return out, mask


def make_dataset(root: str | Path, *, per_class: int = 60, size: tuple[int, int] = (112, 128), seed: int = 0,
                 classes: tuple[str, str] = ("lesion", "normal")) -> Path:
    """Write ``root/images/<class>/*.png`` and ``root/masks/lesion/*.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / "images" / c).mkdir(parents=True, exist_ok=True)
    (root / "masks" / classes[0]).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        for c in classes:
            img, mask = make_image(rng, c == classes[0], size)
            name = f"{c}_{i:03d}.png"
            Image.fromarray(img).save(root / "images" / c / name)
            if c == classes[0]:
                Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / c / name)
    return root
