"""The trained ensemble: members plus what is needed to feed them (classes, size, normalisation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from pixelvote.models.member import Member

if TYPE_CHECKING:
    from pixelvote.explain.evidence import EvidenceRule
    from pixelvote.refine.colour import ColourPrior

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Ensemble:
    members: list[Member]
    classes: list[str]
    background: str
    image_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resize: str = "squash"  # how images become the square input: pixelvote.data.transforms.fit_image
    # the diagnosis is a finding where P(not background) exceeds this (train chooses it on the validation
    # images); None: the most probable class (pixelvote.explain.analyze.diagnose)
    decision_threshold: float | None = None
    # where train kept it, the diagnosis weighs the colour evidence too (pixelvote.explain.evidence), with
    # the run's colour prior; it then replaces decision_threshold
    evidence_rule: EvidenceRule | None = None
    colour_prior: ColourPrior | None = None

    @property
    def background_index(self) -> int:
        return self.classes.index(self.background)

    def to(self, device: torch.device | str) -> Ensemble:
        self.device = torch.device(device)
        for m in self.members:
            # channels_last: about 1.3x faster convolutions on CPU (bench/speed.py), and what cuDNN prefers
            m.to(self.device, memory_format=torch.channels_last)
        return self

    def fold_batchnorm(self) -> int:
        """For inference only: fold each member's conv -> batch-norm pairs (:mod:`pixelvote.models.fold`);
        the CAM and fine layers keep their outputs. Returns how many pairs were folded."""
        from pixelvote.models.fold import fold_batchnorm
        from pixelvote.models.registry import get_spec

        total = 0
        for m in self.members:
            spec = get_spec(m.name)
            keep = {m.cam_layer, spec.cam_layer} | ({spec.fine_layer} if spec.fine_layer else set())
            example = torch.randn(1, 3, self.image_size, self.image_size, device=self.device)
            m.backbone, n = fold_batchnorm(m.backbone.eval(), example, keep=keep)
            m.to(self.device, memory_format=torch.channels_last)
            total += n
        return total

    def eval(self) -> Ensemble:
        for m in self.members:
            m.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 (B,3,H,W)`` or float in [0,1] -> float in [0,1] on the ensemble's device (each member
        applies the normalisation its own weights expect)."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last)

    def modules(self) -> list[nn.Module]:
        return list(self.members)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` (``--device``) checked against what this machine has; None or "": CUDA when present."""
    from pixelvote.errors import ConfigError

    if device is None or device == "":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device}: not a device name",
                          fix="--device cpu, --device cuda or --device cuda:N, or leave it out (CUDA when "
                              "present)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this machine has no usable CUDA GPU",
                              fix="--device cpu, or leave --device out (CUDA is used when present)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s), numbered from 0",
                              fix=f"--device cuda:0 … cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: Apple's MPS is not available here", fix="--device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: pixelvote runs on cpu, cuda or mps", fix="--device cpu")
    return dev
