"""Capturing a layer's activation so gradients can be taken to it, and to nothing before it."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn


class ActivationCapture:
    """Context manager that records the output of ``model``'s sub-module ``layer``.

    With ``cut=True`` the activation is detached and re-attached as a leaf that requires grad, and grad
    mode is switched on from that point of the forward pass: run the forward under ``torch.no_grad()`` and
    only the part *after* the target layer records a graph, so ``torch.autograd.grad(y, capture.activation)``
    touches nothing upstream and no parameter gets a ``.grad``. Hooks are always removed and the grad mode
    restored on exit; exceptions propagate.
    """

    def __init__(self, model: nn.Module, layer: str, *, cut: bool = True) -> None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"expected a sub-module name of {type(model).__name__} but got {layer!r}")
        self.module = modules[layer]
        self.cut = cut
        self.activation: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._grad_mode = torch.is_grad_enabled()

    def _hook(self, _m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if self.cut:
            torch.set_grad_enabled(True)
            out = out.detach().requires_grad_(True)
        self.activation = out
        return out

    def __enter__(self) -> ActivationCapture:
        self._grad_mode = torch.is_grad_enabled()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.remove()
        torch.set_grad_enabled(self._grad_mode)
