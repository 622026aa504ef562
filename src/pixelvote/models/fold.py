"""Fold each batch norm that directly follows a convolution into that convolution, for inference.

In eval mode a batch norm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution with scaled
weights and a bias. On a CPU the separate batch-norm pass costs about a third of an EfficientNet-Lite's
forward time (bench/speed.py). Which batch norms follow which convolutions is found by running the model
once with hooks (a batch norm folds only when its input *is* a convolution's output and that output goes
nowhere else), and the folded model is checked against the original on the same input; if it differs by
more than float noise, nothing is folded. timm's ``BatchNormAct2d`` keeps its activation.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batch-norm name) pairs where the batch norm's input is the conv's output tensor and that
    tensor is read by no other hooked module."""
    produced: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # ids are only unique while the tensors live
    hooks = []

    def wrote(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            alive.append(out)
            produced[id(out)] = name
        return hook

    def read(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, inputs: tuple) -> None:
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    alive.append(t)
                    readers.setdefault(id(t), []).append(name)
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(wrote(name)))
        if not list(mod.children()) or isinstance(mod, nn.BatchNorm2d):
            hooks.append(mod.register_forward_pre_hook(read(name)))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    del out
    mods = dict(model.named_modules())
    pairs = []
    for tid, conv in produced.items():
        rs = readers.get(tid, [])
        bn = mods[rs[0]] if len(rs) == 1 else None
        conv_mod = mods[conv]
        if (isinstance(bn, nn.BatchNorm2d) and isinstance(conv_mod, nn.Conv2d)
                and bn.num_features == conv_mod.out_channels):
            pairs.append((conv, rs[0]))
    return pairs


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _replacement(bn: nn.BatchNorm2d) -> nn.Module:
    if hasattr(bn, "act"):  # timm BatchNormAct2d: keep what it does after the normalisation
        drop, act = getattr(bn, "drop", nn.Identity()), bn.act
        assert isinstance(drop, nn.Module) and isinstance(act, nn.Module)
        return nn.Sequential(drop, act)
    return nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, keep: set[str] | frozenset[str] = frozenset(),
                   atol: float = 1e-3) -> tuple[nn.Module, int]:
    """A copy of ``model`` (in eval mode) with its conv -> batch-norm pairs folded, and how many were folded.
    ``example`` is an input of the shape the model will see (its values do not matter). Convolutions named
    in ``keep`` (layers whose own output is read, e.g. a CAM layer) are left as they are."""
    model = model.eval()
    try:
        return _fold(model, example, keep, atol)
    except Exception as exc:  # an optimisation must never stop a run
        log.warning("batch-norm folding failed (%s); running the model unfolded", exc)
        return model, 0


def _fold(model: nn.Module, example: torch.Tensor, keep: set[str] | frozenset[str],
          atol: float) -> tuple[nn.Module, int]:
    pairs = [(c, b) for c, b in _pairs(model, example) if c not in keep]
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    mods = dict(folded.named_modules())
    n_folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        if bn.running_mean is None or bn.running_var is None:
            continue
        scale = ((bn.weight if bn.affine else torch.ones_like(bn.running_var))
                 / torch.sqrt(bn.running_var + bn.eps))
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        if type(conv) is not nn.Conv2d:  # e.g. timm's Conv2dSame pads in its own forward
            continue
        new = copy.deepcopy(conv)
        new.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        new.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        _set(folded, conv_name, new)
        _set(folded, bn_name, _replacement(bn))
        n_folded += 1
    folded.eval()
    ref, got = model(example), folded(example)
    err = (ref - got).abs().max().item()
    if not torch.isfinite(got).all() or err > atol * max(1.0, ref.abs().max().item()):
        log.warning("batch-norm folding changed the output by %.3g; running the model unfolded", err)
        return model, 0
    return folded, n_folded
