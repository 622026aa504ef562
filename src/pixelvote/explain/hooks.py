"""Capturing layer activations so gradients can be taken to them, and to nothing before them."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn


class ActivationCapture:
    """Context manager that records the outputs of ``model``'s sub-modules ``layers`` (one name or several).

    With ``cut=True`` the first captured activation (in forward order) is detached and re-attached as a
    leaf that requires grad, and grad mode is switched on from that point of the forward pass: run the
    forward under ``torch.no_grad()`` and only the part *after* that layer records a graph, so
    ``torch.autograd.grad(y, capture.activation)`` touches nothing upstream and no parameter gets a
    ``.grad``. Later layers are recorded inside that graph. Hooks are always removed and the grad mode
    restored on exit; exceptions propagate.
    """

    def __init__(self, model: nn.Module, layers: str | list[str], *, cut: bool = True) -> None:
        names = [layers] if isinstance(layers, str) else list(layers)
        modules = dict(model.named_modules())
        for layer in names:
            if layer not in modules:
                raise ValueError(f"expected a sub-module name of {type(model).__name__} but got {layer!r}")
        self.names = names
        self.modules = [modules[n] for n in names]
        self.cut = cut
        self.activations: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_mode = torch.is_grad_enabled()

    @property
    def activation(self) -> torch.Tensor | None:
        """The activation of the first named layer."""
        return self.activations.get(self.names[0])

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if self.cut and not self.activations:
                torch.set_grad_enabled(True)
                out = out.detach().requires_grad_(True)
            self.activations[name] = out
            return out

        return hook

    def __enter__(self) -> ActivationCapture:
        self._grad_mode = torch.is_grad_enabled()
        self._handles = [m.register_forward_hook(self._hook(n))
                         for n, m in zip(self.names, self.modules, strict=True)]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        torch.set_grad_enabled(self._grad_mode)
