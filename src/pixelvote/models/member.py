"""One ensemble member: a backbone, its CAM layer, and an explicit dropout head for MC Dropout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pixelvote.errors import ConfigError
from pixelvote.models.registry import get_spec
from pixelvote.models.weights import pretrained_state


class Member(nn.Module):
    """``x (B,3,H,W) in [0,1] -> normalise -> backbone -> A (B,C,h,w) -> mean over h,w -> Dropout(p)
    -> Linear -> logits (B,K)``."""

    def __init__(self, name: str, backbone: nn.Module, channels: int, num_classes: int, dropout: float,
                 cam_layer: str) -> None:
        super().__init__()
        spec = get_spec(name)
        # the normalisation its pretrained weights expect; not saved (it belongs to the architecture)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1) but got {dropout}")
        self.name = name
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self.cam_layer = cam_layer
        self.final_cam_layer = cam_layer == get_spec(name).cam_layer
        if cam_layer not in dict(self.backbone.named_modules()):
            from pixelvote.errors import did_you_mean

            names = [n for n, _ in self.backbone.named_modules() if n]
            raise ConfigError(f"unknown CAM layer for {name}: {did_you_mean(cam_layer, names)}")

    @property
    def p(self) -> float:
        return float(self.dropout.p)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: images as floats in [0, 1], ``(B, 3, H, W)`` -> final feature map ``(B, C, h, w)``."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x))))


def build_member(name: str, num_classes: int, *, dropout: float = 0.3, pretrained: bool = True,
                 weights_dir: str | Path | None = None, cam_layer: str | None = None) -> Member:
    spec = get_spec(name)
    state = pretrained_state(spec, weights_dir) if pretrained else None
    backbone = spec.build(state)
    return Member(name, backbone, spec.channels, num_classes, dropout, cam_layer or spec.cam_layer)


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Switch on only the dropout modules (BatchNorm stays in eval); restore every module's flag on exit."""
    flags = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train(True)
        yield model
    finally:
        for m, f in flags.items():
            m.training = f
