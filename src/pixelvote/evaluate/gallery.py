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
_TITLES = {"best_cls": "best", "worst_cls": "worst"}


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
        """Cases for ``write_report``, best first within each group; an image is shown once."""
        use_pixel = any(self._heaps[g] for g in _PIXEL)
        groups = (*(_PIXEL if use_pixel else _CLASS), "flagged")
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for g in groups:
            for _, _, item in sorted(self._heaps[g], key=lambda e: (e[0], e[1]), reverse=True):
                ident = str(item.get("title"))
                if ident in seen:
                    continue
                seen.add(ident)
                out.append({**item, "group": _TITLES.get(g, g)})
        return out


def _thumb_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(h, w, 1))
    return max(1, round(h * s)), max(1, round(w * s))


def thumbnail_case(image: np.ndarray, truth: torch.Tensor | None, margin: torch.Tensor,
                   members: dict[str, torch.Tensor], uncertainty: torch.Tensor, *, title: str, caption: str,
                   max_side: int = 256) -> dict[str, Any]:
    """A gallery case at most ``max_side`` pixels on its long side.

    ``image`` ``(H, W, 3)`` uint8 at the original size, ``truth`` ``(H, W)`` bool or None, ``margin`` and
    ``uncertainty`` ``(S, S)`` at the model's size (the mask is ``margin > 0`` after a bilinear resize, as
    for the metrics), ``members`` ``{name: (S, S) CAM}``."""
    h, w = image.shape[:2]
    th, tw = _thumb_size(h, w, max_side)
    img = image if (th, tw) == (h, w) else np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    t = None
    if truth is not None:
        t = F.interpolate(truth[None, None].float().cpu(), size=(th, tw), mode="nearest")[0, 0] > 0.5
    cons = upsample(margin.float().cpu(), (th, tw)) > 0
    unc = upsample(uncertainty.float().cpu(), (th, tw)).clamp_min(0)
    return {"image": np.ascontiguousarray(img), "truth": None if t is None else t.numpy(),
            "consensus": cons.numpy(), "members": {k: v.float().cpu().numpy() for k, v in members.items()},
            "uncertainty": unc.numpy(), "title": title, "caption": caption}
