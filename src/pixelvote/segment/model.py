"""The segmenter: segmentation_models_pytorch FPN on a timm encoder, initialised from offline ImageNet weights."""

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
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            from pixelvote.models.weights import pretrained_state

            full = pretrained_state(spec, weights_dir)
            enc = self.net.encoder.model
            own = enc.state_dict()
            enc.load_state_dict({k: full[k] for k in own if k in full}, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)[:, 0]
