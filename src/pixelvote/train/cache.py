"""Decode every training image once, validate it (and its mask), and keep a resized copy in memory.

Fine-tuning three members for several epochs reads each image many times; decoding once makes CPU training
several times faster. Unusable files are reported (path and reason) and left out, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelvote.data.dataset import Sample
from pixelvote.data.imageio import read_image, read_mask
from pixelvote.data.transforms import fit_image, resize_mask, to_tensor
from pixelvote.errors import DataError

log = logging.getLogger(__name__)

# truths kept "at the image's size" are kept at most this long a side (1 MB each as bool), so that a
# validation split of large photos does not hold gigabytes; their aspect and placement are unchanged
FULL_MASK_SIDE = 1024


@dataclass
class CachedSet:
    samples: list[Sample]
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) long
    masks: torch.Tensor  # (N, S, S) bool (all False where no mask)
    has_mask: torch.Tensor  # (N,) bool
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # each mask at its image's own size (None where there is none), where asked for: what calibration
    # scores, as users get masks and evaluate scores them
    full_masks: list[torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, rows: list[int]) -> CachedSet:
        """The images at ``rows``, in that order (no skipped list)."""
        idx = torch.tensor(rows, dtype=torch.long)
        full = None if self.full_masks is None else [self.full_masks[i] for i in rows]
        return CachedSet([self.samples[i] for i in rows], self.images[idx], self.labels[idx], self.masks[idx],
                         self.has_mask[idx], [], full)

    def concat(self, other: CachedSet) -> CachedSet:
        """This set's images followed by ``other``'s (both keep truths at the image's size, or neither)."""
        if (self.full_masks is None) != (other.full_masks is None):
            raise ValueError("both sets must keep their truths alike (full_masks)")
        full = None if self.full_masks is None else [*self.full_masks, *(other.full_masks or [])]
        return CachedSet([*self.samples, *other.samples], torch.cat([self.images, other.images]),
                         torch.cat([self.labels, other.labels]), torch.cat([self.masks, other.masks]),
                         torch.cat([self.has_mask, other.has_mask]), [*self.skipped, *other.skipped], full)

    def truth(self, i: int) -> torch.Tensor | None:
        """Image ``i``'s mask at the image's own size where the set keeps it (as users get masks and
        ``evaluate`` scores them), else on the model input; None where it has none."""
        if not bool(self.has_mask[i]):
            return None
        return self.full_masks[i] if self.full_masks is not None else self.masks[i]


def cache_samples(samples: list[Sample], classes: list[str], size: int, *, desc: str = "reading images",
                  with_masks: bool = True, resize: str = "squash", full_masks: bool = False) -> CachedSet:
    """Decode ``samples`` once into model inputs of ``size`` px (placed by ``resize``, see
    :func:`pixelvote.data.transforms.fit_image`), with their masks placed alike (and, with ``full_masks``,
    also kept at the image's size); unreadable ones are skipped and listed."""
    images, labels, masks, has, kept = [], [], [], [], []
    full: list[torch.Tensor | None] = []
    skipped: list[tuple[str, str]] = []
    for s in tqdm(samples, desc=desc, unit="img", leave=False):
        try:
            img = read_image(s.path)
            m = None
            if with_masks and s.mask is not None:
                m = read_mask(s.mask, (img.shape[1], img.shape[0]))
        except DataError as exc:
            log.warning("skipped: %s", exc)
            skipped.append((str(s.path if exc.path is None else exc.path), str(exc)))
            continue
        images.append(fit_image(to_tensor(img), size, resize))
        labels.append(classes.index(s.label))
        masks.append(resize_mask(m, size, resize) if m is not None
                     else torch.zeros(size, size, dtype=torch.bool))
        has.append(m is not None)
        if full_masks:
            full.append(_at_most(m, FULL_MASK_SIDE) if m is not None else None)
        kept.append(s)
    if not kept:
        return CachedSet([], torch.zeros(0, 3, size, size, dtype=torch.uint8),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0, size, size, dtype=torch.bool),
                         torch.zeros(0, dtype=torch.bool), skipped, [] if full_masks else None)
    return CachedSet(kept, torch.stack(images), torch.tensor(labels), torch.stack(masks), torch.tensor(has),
                     skipped, full if full_masks else None)


def _at_most(mask: np.ndarray, side: int) -> torch.Tensor:
    """``(H, W) bool`` as a tensor, scaled down (area-weighted, then > 0.5) where its longer side exceeds
    ``side``."""
    h, w = mask.shape
    if max(h, w) <= side:
        return torch.from_numpy(mask)
    scale = side / max(h, w)
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(x, size=hw, mode="area")[0, 0] > 0.5
