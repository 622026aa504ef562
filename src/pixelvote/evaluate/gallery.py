"""Gallery of an evaluation: the best, worst and flagged cases, kept in bounded heaps while streaming.

Only the few cases that will be shown are ever held (as small thumbnails), however many images are
evaluated. A case is built lazily: ``offer`` calls ``build`` only when the case enters its heap.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pixelvote.explain.analyze import upsample

__all__ = ["GalleryKeeper", "thumbnail_case"]

#: Groups ranked by localisation (images with a pixel truth) and, failing those, by classification.
_PIXEL = ("best", "worst")
_CLASS = ("best_cls", "worst_cls")


class GalleryKeeper:
    """Bounded heaps of cases: ``best`` / ``worst`` (by IoU, or by confidence when no image has a pixel
    truth) and ``flagged`` (most uncertain flagged images). Higher key = more wanted in its group."""

    def __init__(self, max_items: int) -> None:
        per = max(0, int(max_items)) // 3
        extra = max(0, int(max_items)) - 3 * per
        self.capacity = {"best": per + (extra > 0), "worst": per + (extra > 1), "flagged": per}
        self.capacity.update({"best_cls": self.capacity["best"], "worst_cls": self.capacity["worst"]})
        self._heaps: dict[str, list[tuple[float, int, dict[str, Any]]]] = {g: [] for g in self.capacity}
        self._tick = itertools.count()

    def wants(self, group: str, key: float) -> bool:
        heap, cap = self._heaps[group], self.capacity[group]
        return cap > 0 and (len(heap) < cap or key > heap[0][0])

    def offer(self, group: str, key: float, build: Callable[[], dict[str, Any]]) -> None:
        if not self.wants(group, key):
            return
        entry = (key, -next(self._tick), build())  # earlier images win ties
        heap = self._heaps[group]
        if len(heap) < self.capacity[group]:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)

    def items(self) -> list[dict[str, Any]]:
        """Cases for ``write_report``, best first within each group; an image is shown once. With fewer
        ranked images than places, the ranked images are split between ``best`` and ``worst``."""
        if any(self._heaps[g] for g in _PIXEL):
            best, worst = self._split("best", "worst")
        else:
            best, worst = (self._sorted(g) for g in _CLASS)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for group, cases in (("best", best), ("worst", worst), ("flagged", self._sorted("flagged"))):
            for item in cases:
                ident = str(item.get("title"))
                if ident not in seen:
                    seen.add(ident)
                    out.append({**item, "group": group})
        return out

    def _sorted(self, group: str) -> list[dict[str, Any]]:
        return [e[2] for e in sorted(self._heaps[group], key=lambda e: (e[0], e[1]), reverse=True)]

    def _split(self, hi: str, lo: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Top of ``hi`` and bottom of ``lo`` (whose keys are negated), without showing an image twice."""
        ranked: dict[str, tuple[float, int, dict[str, Any]]] = {}
        for key, tick, item in self._heaps[hi]:
            ranked[str(item.get("title"))] = (key, tick, item)
        for key, tick, item in self._heaps[lo]:
            ranked.setdefault(str(item.get("title")), (-key, tick, item))
        order = [e[2] for e in sorted(ranked.values(), key=lambda e: (e[0], e[1]), reverse=True)]
        n_hi, n_lo = self.capacity[hi], self.capacity[lo]
        top = n_hi if len(order) >= n_hi + n_lo else min(n_hi, (len(order) + 1) // 2)
        return order[:top], order[top:][::-1][:n_lo]


def _thumb_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(h, w, 1))
    return max(1, round(h * s)), max(1, round(w * s))


def thumbnail_case(image: np.ndarray, truth: torch.Tensor | None, margin: torch.Tensor,
                   members: dict[str, torch.Tensor], uncertainty: torch.Tensor, *, title: str, caption: str,
                   max_side: int = 256) -> dict[str, Any]:
    """A gallery case at most ``max_side`` pixels on its long side.

    ``image`` ``(H, W, 3)`` uint8 at the original size, ``truth`` ``(H, W)`` bool or None, ``margin`` and
    ``uncertainty`` on the part of the model input that covers the image
    (:func:`pixelvote.data.transforms.crop_content`; the mask is ``margin > 0`` after a bilinear resize, as
    for the metrics), ``members`` ``{name: CAM}`` likewise."""
    h, w = image.shape[:2]
    th, tw = _thumb_size(h, w, max_side)
    img = image
    if (th, tw) != (h, w):
        img = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR))
    t = None
    if truth is not None:
        t = F.interpolate(truth[None, None].float().cpu(), size=(th, tw), mode="nearest")[0, 0] > 0.5
    cons = upsample(margin.float().cpu(), (th, tw)) > 0
    unc = upsample(uncertainty.float().cpu(), (th, tw)).clamp_min(0)
    return {"image": np.ascontiguousarray(img), "truth": None if t is None else t.numpy(),
            "consensus": cons.numpy(), "members": {k: v.float().cpu().numpy() for k, v in members.items()},
            "uncertainty": unc.numpy(), "title": title, "caption": caption}
