"""Evaluation metrics: masks, boxes, thresholds, classification, calibration, selective prediction.

Plain functions on torch tensors (numpy arrays are accepted at the boundary and converted), plus two
summable accumulators (:class:`PixelStats`, :class:`SweepStats`) whose state is integers, so results
computed by many workers merge exactly, in any order.

Conventions (stated once, used everywhere; docs/evaluation.md says the same):

- A mask is ``(H, W)`` or a batch ``(N, H, W)``: ``bool``, or numbers that are all 0 or 1.
- IoU and Dice are **foreground-only** (the background class is never averaged in).
- **Empty vs empty**: when prediction and truth are both empty, IoU = Dice = ``empty_score``
  (default 1.0: "nothing there, nothing predicted" is a perfect answer). Pass ``float("nan")`` to
  leave such images out of the means instead. One empty and one non-empty mask always score 0.
- **Mean** IoU averages per-image scores; **pooled** IoU is Σ intersection / Σ union over all images
  (large objects weigh more).
- A box is ``(x0, y0, x1, y1)`` in pixel-edge coordinates: pixel column ``j`` spans ``[j, j + 1)``,
  so an integer box covers columns ``x0 .. x1 - 1``. A pixel belongs to a box when its centre does.
- Soft maps are binarised as ``map >= threshold``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = [
    "PixelStats",
    "RiskCoverage",
    "SweepStats",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "box_iou",
    "boxes_to_mask",
    "centred_box",
    "centred_box_prior",
    "classification_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "f1_macro",
    "flag_summary",
    "iou_sweep",
    "mask_dice",
    "mask_iou",
    "mask_to_box",
    "mean_dice",
    "mean_iou",
    "pointing_game",
    "reliability_bins",
    "risk_coverage",
]

ArrayLike = torch.Tensor | np.ndarray
Box = tuple[float, float, float, float]

#: Per-image scores are summed as integers in units of 2**-52 (rounding each score by at most
#: 1.1e-16), so sums merge exactly and the mean does not depend on the order of the images.
_UNIT = 2**52
_CHUNK = 1024  # rows per int64 partial sum: 1024 * 2**52 < 2**63


# --------------------------------------------------------------------------- validation


def _as_tensor(x: Any, name: str, *, allow_sequence: bool = False) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"expected `{name}` to hold numbers but got a numpy array of objects")
        return torch.from_numpy(np.array(x, copy=not x.flags.writeable))
    if allow_sequence and isinstance(x, Sequence) and not isinstance(x, str):
        try:
            return torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise TypeError(f"expected `{name}` to be a sequence of numbers but got {x!r:.80}") from err
    kinds = (
        "a torch.Tensor, numpy.ndarray or sequence" if allow_sequence else "a torch.Tensor or numpy.ndarray"
    )
    raise TypeError(f"expected `{name}` to be {kinds} but got {type(x).__name__}")


def _as_mask(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise TypeError(f"expected `{name}` to be a real-valued mask but got dtype {t.dtype}")
    if t.numel() and not ((t == 0) | (t == 1)).all():
        lo, hi = t.min().item(), t.max().item()
        raise ValueError(
            f"expected `{name}` to be a binary mask (bool, or only 0 and 1) but got values from {lo} to {hi};"
            f" threshold it first (e.g. `{name} > 127` for a 0/255 PNG)"
        )
    return t != 0


def _check_mask_pair(pred: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
    if p.ndim not in (2, 3):
        raise ValueError(f"expected `pred` of shape (H, W) or (N, H, W) but got shape {tuple(p.shape)}")
    if p.shape != t.shape:
        raise ValueError(
            f"expected `target` of the same shape as `pred` {tuple(p.shape)} but got {tuple(t.shape)}"
        )
    return p, t.to(p.device)


def _check_soft(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if not t.is_floating_point():
        raise ValueError(
            f"expected `{name}` to be a floating map with values in [0, 1] but got dtype {t.dtype}"
        )
    t = t.to(torch.float64)
    if t.numel() and not (torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1):
        raise ValueError(
            f"expected `{name}` to hold values in [0, 1] but got values from {t.min().item()}"
            f" to {t.max().item()}"
            " (normalise the map first)"
        )
    return t


def _check_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in size)
        or min(size) < 0
    ):
        raise ValueError(f"expected `size` to be (height, width), two non-negative ints, but got {size!r}")
    return int(size[0]), int(size[1])


def _check_boxes(boxes: Any, name: str = "boxes") -> torch.Tensor:
    t = _as_tensor(boxes, name, allow_sequence=True).to(torch.float64)
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(
            f"expected `{name}` of shape (4,) or (N, 4) as (x0, y0, x1, y1) but got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"expected finite coordinates in `{name}` but got {t.tolist()}")
    if (t[:, 2] < t[:, 0]).any() or (t[:, 3] < t[:, 1]).any():
        raise ValueError(f"expected `{name}` with x1 >= x0 and y1 >= y0 but got {t.tolist()}")
    return t


def _check_labels(target: Any, name: str = "target") -> torch.Tensor:
    t = _as_tensor(target, name, allow_sequence=True)
    if t.is_floating_point():
        if t.numel() and not (t == t.round()).all():
            raise ValueError(f"expected `{name}` to hold integer class indices but got fractional values")
        t = t.to(torch.int64)
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    if t.ndim != 1:
        raise ValueError(f"expected `{name}` of shape (N,) but got shape {tuple(t.shape)}")
    if t.numel() and t.min() < 0:
        raise ValueError(f"expected `{name}` to hold class indices >= 0 but got {t.min().item()}")
    return t.to(torch.int64).cpu()


def _check_probs(probs: Any, n: int, name: str = "probs") -> torch.Tensor:
    """(N,) positive-class probabilities become (N, 2); (N, C) is kept."""
    p = _as_tensor(probs, name, allow_sequence=True)
    if not p.is_floating_point():
        raise ValueError(
            f"expected `{name}` to hold probabilities (floats in [0, 1]) but got dtype {p.dtype}"
        )
    p = p.to(torch.float64).cpu()
    if p.ndim == 1:
        p = torch.stack([1 - p, p], dim=1)
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise ValueError(
            f"expected `{name}` of shape ({n},) or ({n}, C) with C >= 2 but got shape {tuple(p.shape)}"
        )
    if p.numel() and not (torch.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise ValueError(f"expected `{name}` to hold probabilities in [0, 1] but got values outside it")
    return p


def _units(scores: torch.Tensor) -> list[int]:
    """Σ over dim 0 of scores in [0, 1] (NaN counts as 0), in units of 2**-52, as exact Python ints."""
    u = torch.nan_to_num(scores.to(torch.float64), nan=0.0).mul(_UNIT).round().to(torch.int64)
    if u.ndim == 1:
        u = u.unsqueeze(1)
    total = [0] * u.shape[1]
    for start in range(0, u.shape[0], _CHUNK):
        total = [a + b for a, b in zip(total, u[start : start + _CHUNK].sum(0).tolist(), strict=True)]
    return total


def _ratio(num: int, den: int, empty: float) -> float:
    return empty if den == 0 else num / den


def _mean_units(units: int, count: int) -> float:
    return math.nan if count == 0 else float(Fraction(units, _UNIT * count))


# --------------------------------------------------------------------------- masks


def _counts(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    inter = (p & t).flatten(-2).sum(-1)
    pa, ta = p.flatten(-2).sum(-1), t.flatten(-2).sum(-1)
    return inter, pa, ta, pa + ta - inter


def mask_iou(pred: ArrayLike, target: ArrayLike, *, empty_score: float = 1.0) -> torch.Tensor:
    """Per-image foreground IoU |P ∩ T| / |P ∪ T| of binary masks.

    Args:
        pred, target: ``(H, W)`` or ``(N, H, W)`` binary masks of the same shape.
        empty_score: score when both masks are empty (1.0, or NaN to leave the image out of means).

    Returns:
        float64 tensor of shape ``()`` for one mask pair, ``(N,)`` for a batch.
    """
    p, t = _check_mask_pair(pred, target)
    inter, _, _, union = _counts(p, t)
    empty = torch.full(union.shape, float(empty_score), dtype=torch.float64, device=union.device)
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), empty)


def mask_dice(pred: ArrayLike, target: ArrayLike, *, empty_score: float = 1.0) -> torch.Tensor:
    """Per-image Dice 2|P ∩ T| / (|P| + |T|); shapes and ``empty_score`` as :func:`mask_iou`."""
    p, t = _check_mask_pair(pred, target)
    inter, pa, ta, _ = _counts(p, t)
    den = pa + ta
    empty = torch.full(den.shape, float(empty_score), dtype=torch.float64, device=den.device)
    return torch.where(den > 0, 2 * inter.double() / den.clamp(min=1).double(), empty)


def mean_iou(pred: ArrayLike, target: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Mean over images of :func:`mask_iou` (NaN scores left out; NaN if nothing is scored)."""
    return _nanmean(mask_iou(pred, target, empty_score=empty_score))


def mean_dice(pred: ArrayLike, target: ArrayLike, *, empty_score: float = 1.0) -> float:
    """Mean over images of :func:`mask_dice` (NaN scores left out; NaN if nothing is scored)."""
    return _nanmean(mask_dice(pred, target, empty_score=empty_score))


def _nanmean(x: torch.Tensor) -> float:
    x = x.reshape(-1)
    x = x[~torch.isnan(x)]
    return math.nan if x.numel() == 0 else float(x.mean())


@dataclass
class PixelStats:
    """Summable IoU/Dice state: integer totals that merge exactly across workers.

    ``stats.update(pred, target)`` adds images; ``a + b`` (or ``a.merge(b)``) combines workers;
    ``compute()`` gives mean (per image) and pooled (Σ∩ / Σ∪) IoU and Dice.
    """

    empty_score: float = 1.0
    images: int = 0
    scored: int = 0  # images with a defined score (all of them unless empty_score is NaN)
    both_empty: int = 0
    intersection: int = 0
    union: int = 0
    pred_area: int = 0
    target_area: int = 0
    iou_units: int = 0  # Σ per-image IoU in units of 2**-52
    dice_units: int = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> PixelStats:
        """Add one ``(H, W)`` mask pair or a batch ``(N, H, W)``; returns ``self``."""
        p, t = _check_mask_pair(pred, target)
        if p.ndim == 2:
            p, t = p.unsqueeze(0), t.unsqueeze(0)
        inter, pa, ta, union = _counts(p, t)
        iou = mask_iou(p, t, empty_score=self.empty_score)
        dice = mask_dice(p, t, empty_score=self.empty_score)
        self.images += p.shape[0]
        self.scored += int((~torch.isnan(iou)).sum())
        self.both_empty += int((union == 0).sum())
        self.intersection += int(inter.sum())
        self.union += int(union.sum())
        self.pred_area += int(pa.sum())
        self.target_area += int(ta.sum())
        self.iou_units += _units(iou)[0] if iou.numel() else 0
        self.dice_units += _units(dice)[0] if dice.numel() else 0
        return self

    def merge(self, other: PixelStats) -> PixelStats:
        """A new accumulator holding both; the two must share ``empty_score``."""
        if not isinstance(other, PixelStats):
            raise TypeError(f"expected a PixelStats but got {type(other).__name__}")
        if not _same_float(self.empty_score, other.empty_score):
            raise ValueError(
                "expected PixelStats with the same empty_score"
                f" but got {self.empty_score} and {other.empty_score}"
            )
        names = [f for f in self.__dataclass_fields__ if f != "empty_score"]
        return PixelStats(self.empty_score, **{f: getattr(self, f) + getattr(other, f) for f in names})

    def __add__(self, other: PixelStats) -> PixelStats:
        return self.merge(other)

    def __radd__(self, other: Any) -> PixelStats:  # lets sum([...]) start from 0
        if other == 0:
            return self
        return NotImplemented

    def compute(self) -> dict[str, float | int]:
        """Mean and pooled IoU/Dice, plus the counts; NaN means "nothing to score"."""
        e = self.empty_score
        return {
            "images": self.images,
            "scored": self.scored,
            "both_empty": self.both_empty,
            "mean_iou": _mean_units(self.iou_units, self.scored),
            "mean_dice": _mean_units(self.dice_units, self.scored),
            "pooled_iou": _ratio(self.intersection, self.union, e if self.images else math.nan),
            "pooled_dice": _ratio(
                2 * self.intersection, self.pred_area + self.target_area, e if self.images else math.nan
            ),
        }


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# --------------------------------------------------------------------------- boxes


def mask_to_box(mask: ArrayLike) -> tuple[int, int, int, int] | None:
    """Tight box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) around a ``(H, W)`` mask; None if empty."""
    m = _as_mask(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"expected `mask` of shape (H, W) but got shape {tuple(m.shape)}")
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_iou(boxes1: Any, boxes2: Any) -> torch.Tensor:
    """Pairwise IoU of boxes ``(N, 4)`` and ``(M, 4)`` (or single ``(4,)`` boxes) -> ``(N, M)`` float64.

    Areas are ``(x1 - x0) * (y1 - y0)`` as in torchvision's ``box_iou``; two empty boxes score 0.
    """
    a, b = _check_boxes(boxes1, "boxes1"), _check_boxes(boxes2, "boxes2")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(union))


def boxes_to_mask(boxes: Any, size: Sequence[int]) -> torch.Tensor:
    """Filled union of boxes as a bool mask of ``size = (height, width)`` (like a tensor's shape).

    A pixel is inside a box when its centre ``(j + 0.5, i + 0.5)`` is in ``[x0, x1) x [y0, y1)``;
    boxes reaching outside the image are clipped. No boxes gives an empty mask.
    """
    h, w = _check_size(size)
    b = _check_boxes(boxes)
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in b.tolist():
        mask |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return mask


def pointing_game(
    saliency: ArrayLike, mask: ArrayLike | None = None, *, boxes: Any = None, tolerance: int = 15
) -> bool | None:
    """Pointing game (Zhang et al., ECCV 2016): does the saliency maximum hit the object?

    A hit when a pixel of the target region lies at Euclidean distance < ``tolerance`` pixels from the
    arg-max of ``saliency`` (the first maximum in row-major order); 15 px is the literature's default
    (and TorchRay's). With ``tolerance=0`` the maximum itself must lie on the region.

    Args:
        saliency: ``(H, W)`` map.
        mask: ``(H, W)`` binary target region, or
        boxes: target boxes ``(N, 4)`` (their filled union is the region) - give exactly one.

    Returns:
        True (hit), False (miss), or None when the region is empty (nothing to point at: skip it).
    """
    s = _as_tensor(saliency, "saliency")
    if s.ndim != 2:
        raise ValueError(f"expected `saliency` of shape (H, W) but got shape {tuple(s.shape)}")
    if not isinstance(tolerance, int | np.integer) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"expected `tolerance` to be an int >= 0 but got {tolerance!r}")
    if (mask is None) == (boxes is None):
        raise ValueError(
            "expected exactly one of `mask` and `boxes` but got "
            + ("both" if mask is not None else "neither")
        )
    region = boxes_to_mask(boxes, tuple(s.shape)) if mask is None else _as_mask(mask, "mask")
    if region.shape != s.shape:
        raise ValueError(
            f"expected `mask` of the saliency's shape {tuple(s.shape)} but got {tuple(region.shape)}"
        )
    if s.numel() == 0 or not region.any():
        return None
    if torch.isnan(s).any():
        raise ValueError("expected `saliency` without NaN values but got NaN")
    h, w = s.shape
    i, j = divmod(int(torch.argmax(s.reshape(-1))), w)
    if region[i, j]:
        return True
    r = int(tolerance)
    y0, y1, x0, x1 = max(0, i - r), min(h, i + r + 1), max(0, j - r), min(w, j + r + 1)
    ys = torch.arange(y0, y1).sub(i).pow(2)[:, None]
    xs = torch.arange(x0, x1).sub(j).pow(2)[None, :]
    near = (ys + xs) < r * r
    return bool((region[y0:y1, x0:x1].cpu() & near).any())


def centred_box(size: Sequence[int]) -> Box:
    """The trivial prior's box: centred, half the image's width and height, ``(x0, y0, x1, y1)``."""
    h, w = _check_size(size)
    return (w / 4, h / 4, 3 * w / 4, 3 * h / 4)


def centred_box_prior(size: Sequence[int]) -> torch.Tensor:
    """The trivial prior as a bool mask of ``size = (height, width)``: the baseline to show beside any IoU."""
    return boxes_to_mask([centred_box(size)], size)


# --------------------------------------------------------------------------- threshold sweep


def _default_thresholds() -> torch.Tensor:
    return torch.arange(101, dtype=torch.float64) / 100


def _check_thresholds(thresholds: Any) -> torch.Tensor:
    if thresholds is None:
        return _default_thresholds()
    t = _as_tensor(thresholds, "thresholds", allow_sequence=True).to(torch.float64).reshape(-1).cpu()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(
            f"expected `thresholds` to be a non-empty 1-D set of finite numbers but got {t.tolist()}"
        )
    return t


def _sweep_counts(
    soft: torch.Tensor, target: torch.Tensor, th: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersections and unions ``(N, T)`` of ``soft >= t`` with ``target``, all thresholds, by sorting."""
    n = soft.shape[0]
    s = soft.reshape(n, soft.shape[-2] * soft.shape[-1])
    tg = target.reshape(n, target.shape[-2] * target.shape[-1])
    p = s.shape[1]
    values = th.to(s.device).expand(n, -1).contiguous()
    pred_area = p - torch.searchsorted(s.sort(dim=1).values, values, side="left")
    fg = torch.where(tg, s, torch.full_like(s, -math.inf)).sort(dim=1).values
    inter = p - torch.searchsorted(fg, values, side="left")
    union = pred_area + tg.sum(1, keepdim=True) - inter
    return inter.cpu(), union.cpu()


def _prepare_sweep(soft: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    s = _check_soft(soft, "soft")
    t = _as_mask(target, "target")
    if s.ndim not in (2, 3):
        raise ValueError(f"expected `soft` of shape (H, W) or (N, H, W) but got shape {tuple(s.shape)}")
    if s.shape != t.shape:
        raise ValueError(
            f"expected `target` of the same shape as `soft` {tuple(s.shape)} but got {tuple(t.shape)}"
        )
    single = s.ndim == 2
    if single:
        s, t = s.unsqueeze(0), t.unsqueeze(0)
    return s, t.to(s.device), single


def iou_sweep(
    soft: ArrayLike, target: ArrayLike, thresholds: Any = None, *, empty_score: float = 1.0
) -> torch.Tensor:
    """IoU of ``soft >= t`` against ``target`` for every threshold, vectorised (one sort per image).

    Args:
        soft: ``(H, W)`` or ``(N, H, W)`` maps in [0, 1].
        target: binary masks of the same shape.
        thresholds: 1-D thresholds; default 0.00, 0.01, ..., 1.00.

    Returns:
        float64 ``(T,)`` for one map, ``(N, T)`` for a batch.
    """
    th = _check_thresholds(thresholds)
    s, t, single = _prepare_sweep(soft, target)
    inter, union = _sweep_counts(s, t, th)
    iou = torch.where(
        union > 0, inter.double() / union.clamp(min=1).double(), torch.tensor(float(empty_score)).double()
    )
    return iou[0] if single else iou


@dataclass
class SweepStats:
    """Summable threshold-sweep state: per-threshold integer totals, merged exactly across workers.

    ``update`` takes maps of any size (one image at a time if sizes differ); ``compute`` returns
    mean and pooled IoU per threshold and the best threshold by mean IoU.
    """

    thresholds: tuple[float, ...] = field(default_factory=lambda: tuple(_default_thresholds().tolist()))
    empty_score: float = 1.0
    images: int = 0
    scored: list[int] = field(default_factory=list)
    intersection: list[int] = field(default_factory=list)
    union: list[int] = field(default_factory=list)
    iou_units: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thresholds = tuple(_check_thresholds(list(self.thresholds)).tolist())
        n = len(self.thresholds)
        for name in ("scored", "intersection", "union", "iou_units"):
            value = getattr(self, name)
            if not value:
                setattr(self, name, [0] * n)
            elif len(value) != n:
                raise ValueError(f"expected `{name}` of length {n} (one per threshold) but got {len(value)}")

    def update(self, soft: ArrayLike, target: ArrayLike) -> SweepStats:
        """Add one ``(H, W)`` map/mask pair or a batch ``(N, H, W)``; returns ``self``."""
        s, t, _ = _prepare_sweep(soft, target)
        th = torch.tensor(self.thresholds, dtype=torch.float64)
        inter, union = _sweep_counts(s, t, th)
        iou = torch.where(
            union > 0, inter.double() / union.clamp(min=1).double(), torch.tensor(self.empty_score).double()
        )
        self.images += s.shape[0]
        add = lambda acc, new: [a + int(b) for a, b in zip(acc, new, strict=True)]  # noqa: E731
        self.scored = add(self.scored, (~torch.isnan(iou)).sum(0).tolist())
        self.intersection = add(self.intersection, inter.sum(0).tolist())
        self.union = add(self.union, union.sum(0).tolist())
        if iou.shape[0]:
            self.iou_units = add(self.iou_units, _units(iou))
        return self

    def merge(self, other: SweepStats) -> SweepStats:
        """A new accumulator holding both; thresholds and ``empty_score`` must match."""
        if not isinstance(other, SweepStats):
            raise TypeError(f"expected a SweepStats but got {type(other).__name__}")
        if self.thresholds != other.thresholds or not _same_float(self.empty_score, other.empty_score):
            raise ValueError("expected SweepStats with the same thresholds and empty_score but they differ")
        add = lambda a, b: [x + y for x, y in zip(a, b, strict=True)]  # noqa: E731
        return SweepStats(
            self.thresholds,
            self.empty_score,
            self.images + other.images,
            add(self.scored, other.scored),
            add(self.intersection, other.intersection),
            add(self.union, other.union),
            add(self.iou_units, other.iou_units),
        )

    def __add__(self, other: SweepStats) -> SweepStats:
        return self.merge(other)

    def compute(self) -> dict[str, Any]:
        """``{"images", "thresholds", "mean_iou", "pooled_iou", "best_threshold", "best_mean_iou"}``."""
        empty = self.empty_score if self.images else math.nan
        mean = [_mean_units(u, c) for u, c in zip(self.iou_units, self.scored, strict=True)]
        pooled = [_ratio(i, u, empty) for i, u in zip(self.intersection, self.union, strict=True)]
        finite = [k for k, v in enumerate(mean) if not math.isnan(v)]
        best = max(finite, key=lambda k: (mean[k], -k)) if finite else None
        return {
            "images": self.images,
            "thresholds": list(self.thresholds),
            "mean_iou": mean,
            "pooled_iou": pooled,
            "best_threshold": None if best is None else self.thresholds[best],
            "best_mean_iou": None if best is None else mean[best],
        }


# --------------------------------------------------------------------------- classification


def _check_pair_labels(target: Any, preds: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _check_labels(target, "target")
    p = _check_labels(preds, "preds")
    if y.shape != p.shape:
        raise ValueError(
            f"expected `preds` of the same shape as `target` {tuple(y.shape)} but got {tuple(p.shape)}"
        )
    if y.numel() == 0:
        raise ValueError("expected at least one sample but got none")
    return y.numpy(), p.numpy()


def accuracy(target: Any, preds: Any) -> float:
    """Share of correct predictions (``preds`` are class indices)."""
    from sklearn.metrics import accuracy_score

    y, p = _check_pair_labels(target, preds)
    return float(accuracy_score(y, p))


def balanced_accuracy(target: Any, preds: Any) -> float:
    """Mean recall over the classes present in ``target`` (scikit-learn's definition)."""
    from sklearn.metrics import balanced_accuracy_score

    y, p = _check_pair_labels(target, preds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": those are left out
        return float(balanced_accuracy_score(y, p))


def f1_macro(target: Any, preds: Any, num_classes: int | None = None) -> float:
    """Macro F1 over ``range(num_classes)`` (default: every class seen); an empty class scores 0."""
    from sklearn.metrics import f1_score

    y, p = _check_pair_labels(target, preds)
    labels = list(range(_num_classes(num_classes, y, p)))
    return float(f1_score(y, p, labels=labels, average="macro", zero_division=0))


def confusion_matrix(target: Any, preds: Any, num_classes: int | None = None) -> torch.Tensor:
    """``(C, C)`` int64 counts; row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    y, p = _check_pair_labels(target, preds)
    labels = list(range(_num_classes(num_classes, y, p)))
    return torch.from_numpy(sk_confusion_matrix(y, p, labels=labels).astype(np.int64))


def _num_classes(num_classes: int | None, *arrays: np.ndarray) -> int:
    seen = max((int(a.max()) for a in arrays if a.size), default=0) + 1
    if num_classes is None:
        return max(seen, 2)
    if not isinstance(num_classes, int) or num_classes < 2 or num_classes < seen:
        raise ValueError(
            f"expected `num_classes` to be an int >= 2 covering every index (>= {seen})"
            f" but got {num_classes!r}"
        )
    return num_classes


def _check_label_range(y: torch.Tensor, c: int) -> None:
    if y.numel() and y.max() >= c:
        raise ValueError(
            f"expected `target` class indices below {c} (the columns of `probs`) but got {y.max().item()}"
        )


def _auroc_per_class(y: np.ndarray, probs: np.ndarray) -> list[float | None]:
    from sklearn.metrics import roc_auc_score

    out: list[float | None] = []
    for c in range(probs.shape[1]):
        positive = y == c
        out.append(float(roc_auc_score(positive, probs[:, c])) if 0 < positive.sum() < len(y) else None)
    return out


def auroc(target: Any, probs: Any) -> float | None:
    """AUROC: binary (``probs`` ``(N,)`` or ``(N, 2)``) or one-vs-rest macro (``(N, C)``).

    Returns None when a class is absent from ``target`` (AUROC is then undefined).
    """
    y = _check_labels(target)
    p = _check_probs(probs, len(y))
    _check_label_range(y, p.shape[1])
    if p.shape[1] == 2:
        return _auroc_per_class(y.numpy(), p.numpy())[1]
    per_class = _auroc_per_class(y.numpy(), p.numpy())
    defined = [v for v in per_class if v is not None]
    return float(np.mean(defined)) if len(defined) == len(per_class) else None


def classification_metrics(
    target: Any, probs: Any, *, class_names: Sequence[str] | None = None, preds: Any = None
) -> dict[str, Any]:
    """Every classification figure for one model, JSON-ready.

    Args:
        target: ``(N,)`` true class indices.
        probs: ``(N, C)`` class probabilities (or ``(N,)`` positive-class probabilities); the
            prediction is the arg-max unless ``preds`` is given.
        preds: optional ``(N,)`` predicted class indices (a run's decision rule); AUROC still uses ``probs``.
        class_names: optional names, one per class.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "f1_macro", "auroc", "auroc_per_class",
        "confusion_matrix", "class_names"}``; AUROC values are None where undefined.
    """
    y = _check_labels(target)
    if len(y) == 0:
        raise ValueError("expected at least one sample but got none")
    p = _check_probs(probs, len(y))
    c = p.shape[1]
    _check_label_range(y, c)
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"expected {c} `class_names` (one per class) but got {len(class_names)}")
    preds = p.argmax(1) if preds is None else _check_labels(preds)
    per_class = _auroc_per_class(y.numpy(), p.numpy())
    return {
        "n": len(y),
        "accuracy": accuracy(y, preds),
        "balanced_accuracy": balanced_accuracy(y, preds),
        "f1_macro": f1_macro(y, preds, c),
        "auroc": auroc(y, p),
        "auroc_per_class": per_class,
        "confusion_matrix": confusion_matrix(y, preds, c).tolist(),
        "class_names": list(class_names) if class_names is not None else [str(i) for i in range(c)],
    }


# --------------------------------------------------------------------------- calibration


def _confidence_accuracy(probs: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    y = _check_labels(target)
    raw = _as_tensor(probs, "probs", allow_sequence=True)
    p = _check_probs(raw, len(y))
    if raw.ndim == 1:  # torchmetrics' binary definition: confidence = P(positive), "accuracy" = target
        if y.numel() and y.max() > 1:
            raise ValueError(
                f"expected a binary `target` (0/1) with 1-D `probs` but got class {y.max().item()}"
            )
        return p[:, 1], y.double()
    _check_label_range(y, p.shape[1])
    conf, pred = p.max(1)  # top-label definition, as torchmetrics' multiclass calibration error
    return conf, (pred == y).double()


def _bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"expected `n_bins` to be an int >= 1 but got {n_bins!r}")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    return torch.bucketize(conf.contiguous(), edges, right=True) - 1  # [lo, hi); exactly 1.0 -> index n_bins


def expected_calibration_error(probs: Any, target: Any, *, n_bins: int = 15) -> float:
    """ECE with L1 norm over ``n_bins`` equal-width bins, as torchmetrics defines it.

    ``probs`` ``(N, C)``: top-label ECE (confidence = max probability, correct = arg-max is the
    target), torchmetrics' ``multiclass_calibration_error``. ``probs`` ``(N,)`` with a 0/1 target:
    torchmetrics' ``binary_calibration_error`` (confidence = P(positive), outcome = target).
    Bins are ``[k/n, (k+1)/n)`` and, as in torchmetrics, a confidence of exactly 1.0 forms a bin of
    its own. ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|.
    """
    conf, acc = _confidence_accuracy(probs, target)
    if conf.numel() == 0:
        raise ValueError("expected at least one sample but got none")
    idx = _bin_index(conf, n_bins)
    count = torch.bincount(idx, minlength=n_bins + 1).double()
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, acc)
    gap = (acc_sum - conf_sum).abs()  # = count_b * |acc_b - conf_b|
    return float(gap.sum() / count.sum())


def reliability_bins(probs: Any, target: Any, *, n_bins: int = 15) -> dict[str, Any]:
    """Reliability-diagram bins (same confidence/outcome definitions as the ECE), JSON-ready.

    Returns ``{"lower", "upper", "count", "confidence", "accuracy", "ece", "n_bins"}``, one list
    entry per bin; the last bin is closed (it holds confidences of exactly 1.0); empty bins have
    None for confidence and accuracy.
    """
    conf, acc = _confidence_accuracy(probs, target)
    idx = _bin_index(conf, n_bins).clamp(max=n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, acc)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist()
    return {
        "n_bins": n_bins,
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count.tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count, strict=True)],
        "ece": expected_calibration_error(probs, target, n_bins=n_bins) if conf.numel() else None,
    }


# --------------------------------------------------------------------------- selective prediction


@dataclass(frozen=True)
class RiskCoverage:
    """Risk–coverage curve: keep the ``k`` most certain samples, k = 1..N.

    ``coverage[k-1] = k / N``; ``risk[k-1]`` is the mean risk of those samples; ``thresholds[k-1]``
    the uncertainty of the k-th. ``aurc`` is the mean of ``risk`` (area under the curve, Geifman et
    al. 2018); ``e_aurc`` is its excess over the best possible ordering (samples sorted by risk).
    """

    coverage: torch.Tensor
    risk: torch.Tensor
    thresholds: torch.Tensor
    aurc: float
    e_aurc: float

    def at(self, coverage: float) -> float:
        """Selective risk when keeping the ``ceil(coverage · N)`` most certain samples."""
        if not 0 < coverage <= 1:
            raise ValueError(f"expected `coverage` in (0, 1] but got {coverage!r}")
        n = len(self.risk)
        k = max(1, math.ceil(round(coverage * n, 9)))
        return float(self.risk[min(k, n) - 1])

    def to_dict(self, max_points: int = 200) -> dict[str, Any]:
        """JSON-ready: the curve (thinned to at most ``max_points``), AURC and risk at 80/90 % coverage."""
        n = len(self.risk)
        keep = (
            torch.linspace(0, n - 1, min(n, max_points)).round().long().unique()
            if n
            else torch.zeros(0).long()
        )
        return {
            "n": n,
            "coverage": self.coverage[keep].tolist(),
            "risk": self.risk[keep].tolist(),
            "aurc": self.aurc,
            "e_aurc": self.e_aurc,
            "risk_at_80": self.at(0.8),
            "risk_at_90": self.at(0.9),
        }


def _tie_mean(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Replace each value by the mean over its run of equal (sorted) keys."""
    _, inverse, counts = torch.unique_consecutive(keys, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, values)
    return (sums / counts.double())[inverse]


def risk_coverage(risk: Any, uncertainty: Any) -> RiskCoverage:
    """Risk–coverage curve and AURC, ranking samples by ``uncertainty`` (low = kept first).

    Args:
        risk: ``(N,)`` per-sample risk: 1 - correct (misclassification) or 1 - IoU (localisation).
        uncertainty: ``(N,)`` score, higher = less certain (entropy, mutual information, 1 - confidence...).

    Samples with equal uncertainty are given their group's mean risk, i.e. the curve expected under
    random tie-breaking, so it does not depend on input order.
    """
    r = _as_tensor(risk, "risk", allow_sequence=True).to(torch.float64).reshape(-1).cpu()
    u = _as_tensor(uncertainty, "uncertainty", allow_sequence=True).to(torch.float64).reshape(-1).cpu()
    if r.shape != u.shape:
        raise ValueError(f"expected `uncertainty` of the same length as `risk` ({len(r)}) but got {len(u)}")
    if len(r) == 0:
        raise ValueError("expected at least one sample but got none")
    if not (torch.isfinite(r).all() and torch.isfinite(u).all()):
        raise ValueError(
            "expected finite `risk` and `uncertainty` but got NaN or inf (leave unscored samples out)"
        )
    order = torch.argsort(u, stable=True)
    us = u[order]
    rs = _tie_mean(r[order], us)
    k = torch.arange(1, len(r) + 1, dtype=torch.float64)
    curve = rs.cumsum(0) / k
    best = r.sort().values.cumsum(0) / k
    aurc = float(curve.mean())
    return RiskCoverage(k / len(r), curve, us, aurc, aurc - float(best.mean()))


def flag_summary(correct: Any, flagged: Any, iou: Any = None) -> dict[str, Any]:
    """How well the review flags catch errors.

    Args:
        correct: ``(N,)`` bool, the classification was right.
        flagged: ``(N,)`` bool, the image was flagged for review.
        iou: optional ``(N,)`` per-image IoU (NaN where not scored).

    Returns:
        ``n``, ``flagged``, ``flag_rate``, ``errors``, ``errors_caught`` (share of misclassified images
        that are flagged), ``flag_precision`` (share of flagged images that are misclassified),
        ``accuracy_flagged`` / ``accuracy_unflagged`` and, with ``iou``, ``mean_iou_flagged`` /
        ``mean_iou_unflagged``; None where a group is empty.
    """
    c = _as_mask(_as_tensor(correct, "correct", allow_sequence=True), "correct").reshape(-1).cpu()
    f = _as_mask(_as_tensor(flagged, "flagged", allow_sequence=True), "flagged").reshape(-1).cpu()
    if c.shape != f.shape:
        raise ValueError(f"expected `flagged` of the same length as `correct` ({len(c)}) but got {len(f)}")
    wrong = ~c
    n_err, n_flag = int(wrong.sum()), int(f.sum())
    share = lambda num, den: None if den == 0 else num / den  # noqa: E731
    out: dict[str, Any] = {
        "n": len(c),
        "flagged": n_flag,
        "flag_rate": share(n_flag, len(c)),
        "errors": n_err,
        "errors_caught": share(int((wrong & f).sum()), n_err),
        "flag_precision": share(int((wrong & f).sum()), n_flag),
        "accuracy_flagged": share(int((c & f).sum()), n_flag),
        "accuracy_unflagged": share(int((c & ~f).sum()), len(c) - n_flag),
    }
    if iou is not None:
        v = _as_tensor(iou, "iou", allow_sequence=True).to(torch.float64).reshape(-1).cpu()
        if v.shape != c.shape:
            raise ValueError(f"expected `iou` of the same length as `correct` ({len(c)}) but got {len(v)}")
        for name, group in (("mean_iou_flagged", f), ("mean_iou_unflagged", ~f)):
            m = _nanmean(v[group])
            out[name] = None if math.isnan(m) else m
    return out
