"""XGrad-CAM (Fu et al. 2020): channel weight = sum(A * dy/dA) / sum(A), map = ReLU(sum_k w_k A_k)."""

from __future__ import annotations

import torch

_EPS = 1e-7


def xgradcam_weights(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Channel weights ``(..., C)`` from an activation ``(B, C, h, w)`` and gradients
    ``(..., B, C, h, w)``."""
    num = (activation * grad).sum(dim=(-2, -1))
    den = activation.sum(dim=(-2, -1))
    return num / (den + _EPS)


def weighted_map(activation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k w_k A_k)``: activation ``(B, C, h, w)``, weights ``(..., B, C)`` -> raw map
    ``(..., B, h, w)``."""
    return torch.relu(torch.einsum("...bc,bchw->...bhw", weights, activation))


def xgradcam(activation: torch.Tensor, score: torch.Tensor, *, retain_graph: bool = True) -> torch.Tensor:
    """Raw XGrad-CAM ``(B, h, w)`` of the per-image scores ``score (B,)`` (logits of the target class).

    Gradients go to ``activation`` only (``torch.autograd.grad``): no parameter ``.grad`` is written."""
    (grad,) = torch.autograd.grad(score.sum(), activation, retain_graph=retain_graph)
    return weighted_map(activation.detach(), xgradcam_weights(activation.detach(), grad))


def gradcam(activation: torch.Tensor, score: torch.Tensor, *, retain_graph: bool = True) -> torch.Tensor:
    """Grad-CAM (spatially averaged gradients as weights), for comparison and tests."""
    (grad,) = torch.autograd.grad(score.sum(), activation, retain_graph=retain_graph)
    return weighted_map(activation.detach(), grad.mean(dim=(-2, -1)))
