"""Edge-aware refinement of soft maps: the guided filter (He et al. 2010), in torch on the device.

The filtered map is locally a linear function of the guide image, so CAM blobs snap to image edges
while keeping their overall extent. Box means use ``avg_pool2d`` with ``count_include_pad=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_filter(maps: torch.Tensor, guide: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Filter ``maps (N, B, H, W)`` with the grey ``guide (B, H, W)`` in [0, 1] -> ``(N, B, H, W)``."""
    n = maps.shape[0]
    p = maps.reshape(-1, 1, *maps.shape[-2:])
    g = guide.unsqueeze(0).expand(n, *guide.shape).reshape(-1, 1, *guide.shape[-2:])
    mean_i, mean_p = _box(g, radius), _box(p, radius)
    cov_ip = _box(g * p, radius) - mean_i * mean_p
    var_i = _box(g * g, radius) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    out = _box(a, radius) * g + _box(b, radius)
    return out.reshape(maps.shape)


def grey(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` floats in [0, 1] -> ``(B, H, W)`` luminance."""
    w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * w).sum(1)
