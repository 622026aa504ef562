"""One dense CRF pass on numpy arrays, as :func:`pixelvote.refine.crf.dense_crf` runs it for each image.

Kept free of torch so that the worker processes which run it in parallel start in half a second: pydensecrf2
holds the GIL for a whole pass, so threads cannot share the work, processes can.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def build(rgb: np.ndarray, s: dict[str, float]) -> Any:
    """A ``DenseCRF2D`` with its pairwise terms for the colours ``rgb (H, W, 3)`` uint8; ``s`` holds the
    kernel settings in pixels at this size (``gaussian_sxy``, ``gaussian_compat``, ``bilateral_sxy``,
    ``bilateral_srgb``, ``bilateral_compat``)."""
    import pydensecrf.densecrf as dcrf

    H, W = rgb.shape[:2]
    d = dcrf.DenseCRF2D(W, H, 2)
    d.addPairwiseGaussian(sxy=s["gaussian_sxy"], compat=s["gaussian_compat"])
    d.addPairwiseBilateral(sxy=s["bilateral_sxy"], srgb=s["bilateral_srgb"], rgbim=np.ascontiguousarray(rgb),
                           compat=s["bilateral_compat"])
    return d


def _set_unary(d: Any, p: np.ndarray) -> None:
    unary = -np.log(np.stack([1.0 - p, p]).reshape(2, -1))
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))


def infer(d: Any, p: np.ndarray, iterations: int) -> np.ndarray:
    """The object's marginal ``(H, W)`` after mean-field inference on ``d`` with the object probability
    ``p (H, W)`` (strictly inside (0, 1)) as the unary."""
    _set_unary(d, p)
    return np.asarray(d.inference(iterations), dtype=np.float32)[1].reshape(p.shape)


def infer_steps(d: Any, p: np.ndarray, counts: Iterable[int]) -> dict[int, np.ndarray]:
    """:func:`infer` after each of ``counts`` iterations, from one run of ``max(counts)`` iterations
    (mean-field inference is iterative: its state after 3 steps is where the 5th starts). The results equal
    those of separate :func:`infer` calls."""
    wanted = sorted(set(counts))
    _set_unary(d, p)
    q, tmp1, tmp2 = d.startInference()
    out: dict[int, np.ndarray] = {}
    for step in range(1, wanted[-1] + 1):
        d.stepInference(q, tmp1, tmp2)
        if step in wanted:
            out[step] = np.array(q, dtype=np.float32)[1].reshape(p.shape)  # a copy: q changes in place
    return out


def marginal_steps(p: np.ndarray, rgb: np.ndarray, s: dict[str, float],
                   counts: Iterable[int]) -> list[dict[int, np.ndarray]]:
    """:func:`infer_steps` on a fresh CRF for each image of ``p (N, H, W)`` and ``rgb (N, H, W, 3)``."""
    counts = tuple(counts)
    return [infer_steps(build(rgb[i], s), p[i], counts) for i in range(len(p))]


def marginals(p: np.ndarray, rgb: np.ndarray, s: dict[str, float]) -> np.ndarray:
    """:func:`infer` on a fresh CRF for each image of ``p (N, H, W)`` and ``rgb (N, H, W, 3)``."""
    return np.stack([infer(build(rgb[i], s), p[i], int(s["iterations"])) for i in range(len(p))])
