"""Edge-aware refinement of soft maps: the guided filter (He et al. 2010), in torch on the device.

The filtered map is locally a linear function of the guide image, so CAM blobs snap to image edges
while keeping their overall extent. Box means are separable cumulative sums (O(1) per pixel).
"""

from __future__ import annotations

import torch


def _window_sum(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Sum over the window [i - r, i + r] (clipped at the edges) along ``dim``, by a cumulative sum."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    c = torch.cat([zero, c], dim=dim)  # c[k] = sum of the first k values
    idx = torch.arange(n, device=x.device)
    hi = (idx + r + 1).clamp(max=n)
    lo = (idx - r).clamp(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window of the valid pixels (as ``avg_pool2d(count_include_pad=False)``), in
    O(1) per pixel: separable cumulative sums (a window's count of valid pixels is rows x columns)."""
    h, w = x.shape[-2:]
    ones_h = _window_sum(torch.ones(h, 1, device=x.device, dtype=x.dtype), r, 0)
    ones_w = _window_sum(torch.ones(1, w, device=x.device, dtype=x.dtype), r, 1)
    return _window_sum(_window_sum(x, r, -2), r, -1) / (ones_h * ones_w)


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
