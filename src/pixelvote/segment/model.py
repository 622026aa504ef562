"""The segmenter: segmentation_models_pytorch FPN on a timm encoder, initialised from offline ImageNet
weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pixelvote.errors import ConfigError
from pixelvote.models.registry import get_spec


class Segmenter(nn.Module):
    """``x (B,3,H,W)`` floats in [0, 1] -> foreground logits ``(B, H, W)``."""

    def __init__(self, encoder: str = "efficientnet_lite0", *, pretrained: bool = True,
                 weights_dir: str | Path | None = None, pyramid_channels: int = 64,
                 segmentation_channels: int = 32, flip_tta: bool = False) -> None:
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise ConfigError("stage two needs segmentation-models-pytorch",
                              fix="pip install segmentation-models-pytorch") from None
        spec = get_spec(encoder)
        if spec.source != "timm":
            raise ConfigError(f"segmenter encoders are timm backbones; {encoder} is from {spec.source}",
                              fix="use --encoder efficientnet_lite0 (or lite1/lite2)")
        self.encoder_name = encoder
        # smp's default decoder (256 / 128 channels at 1/4 of the input size) costs more than the encoder;
        # 64 / 32 keeps the segmenter several times cheaper than the ensemble (bench/ablation.py)
        self.net = smp.FPN(f"tu-{encoder}", encoder_weights=None, classes=1,
                           decoder_pyramid_channels=pyramid_channels,
                           decoder_segmentation_channels=segmentation_channels)
        self.flip_tta = flip_tta
        self.input_size: int | None = None  # the size it was trained at (set on loading), for predict
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            from pixelvote.models.weights import pretrained_state

            self.load_encoder(pretrained_state(spec, weights_dir))

    def load_encoder(self, full: dict[str, torch.Tensor]) -> None:
        """Encoder weights from ``full``, a state dict of the whole timm model (extra keys are ignored)."""
        enc = self.net.encoder.model
        own = enc.state_dict()
        enc.load_state_dict({k: full[k] for k in own if k in full}, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)[:, 0]


class SegmenterEnsemble(nn.Module):
    """Several segmenters as one: ``x (B,3,H,W)`` -> the logit of their mean foreground probability. Trained
    apart (other seeds or encoders), their mistakes differ; their mean is steadier than any one of them
    (BUSI: 0.369-0.385 alone, 0.391-0.407 together; docs/results.md)."""

    def __init__(self, members: list[Segmenter]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.flip_tta = all(m.flip_tta for m in members)
        self.input_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0)
        return torch.logit(prob.clamp(1e-6, 1 - 1e-6))


def encoder_from_run(run: str | Path, encoder: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The fine-tuned weights of ``run``'s first member built on the same timm network as ``encoder`` (e.g.
    ``efficientnet_lite0_os16`` for ``efficientnet_lite0``: output stride does not change the weights), as
    ``(member name, timm state dict)``; None when no member matches."""
    from pixelvote.models.checkpoint import load_member_state, member_file, read_run_config
    from pixelvote.models.member import build_member

    arch = get_spec(encoder).arch or encoder
    rc = read_run_config(run)
    for i, mc in enumerate(rc.members):
        spec = get_spec(mc.name)
        if spec.source != "timm" or (spec.arch or spec.name) != arch:
            continue
        member = build_member(mc.name, len(rc.classes), dropout=mc.dropout, pretrained=False)
        load_member_state(member, Path(run) / (mc.file or member_file(i, mc.name)))
        return mc.name, member.backbone.net.state_dict()
    return None
