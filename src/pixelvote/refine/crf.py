"""Dense CRF refinement of a fused soft map (Kraehenbuehl & Koltun 2011), via ``pydensecrf2``.

The fused map ``p`` in [0, 1] is the unary (``-log p`` for the object, ``-log(1-p)`` for the rest); a
Gaussian smoothness kernel and a bilateral (position + colour) kernel pull the labels of similar,
nearby pixels together, so a blob that covers an object's centre spreads to the object's edges and stops
there. The output is the object's marginal probability after mean-field inference, again in [0, 1], which
the consensus thresholds like any other fused map. Runs on the CPU at the model's input size.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pixelvote.errors import ConfigError

INSTALL_HINT = "pip install 'pixelvote[crf]'  (or: pip install pydensecrf2; it compiles, so it needs a C++ compiler)"


class CRFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bilateral_sxy: float = Field(0.18, gt=0, description="bilateral kernel width, as a fraction of the map size")
    bilateral_srgb: float = Field(13.0, gt=0, description="bilateral kernel colour width (0-255 scale)")
    bilateral_compat: float = Field(10.0, ge=0)
    gaussian_sxy: float = Field(3.0, gt=0, description="smoothness kernel width in pixels")
    gaussian_compat: float = Field(3.0, ge=0)
    iterations: int = Field(5, ge=1, le=50)


def available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(soft: torch.Tensor, images: torch.Tensor, cfg: CRFConfig | None = None) -> torch.Tensor:
    """Refine ``soft (B, H, W)`` in [0, 1] with the colour ``images (B, 3, H, W)`` (uint8, or float in
    [0, 1]) -> the foreground marginal ``(B, H, W)`` on ``soft``'s device."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise ConfigError("the dense CRF refinement needs pydensecrf2, which is not installed",
                          fix=INSTALL_HINT) from exc
    cfg = cfg or CRFConfig()
    B, H, W = soft.shape
    p = soft.detach().float().clamp(1e-4, 1 - 1e-4).cpu().numpy()
    imgs = images.detach()
    if imgs.dtype != torch.uint8:
        imgs = (imgs.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    rgb = imgs.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    sxy = cfg.bilateral_sxy * max(H, W)
    out = np.empty((B, H, W), np.float32)
    for b in range(B):
        unary = -np.log(np.stack([1.0 - p[b], p[b]]).reshape(2, -1))
        d = dcrf.DenseCRF2D(W, H, 2)
        d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        d.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
        d.addPairwiseBilateral(sxy=sxy, srgb=cfg.bilateral_srgb, rgbim=np.ascontiguousarray(rgb[b]),
                               compat=cfg.bilateral_compat)
        out[b] = np.asarray(d.inference(cfg.iterations), dtype=np.float32)[1].reshape(H, W)
    return torch.from_numpy(out).to(soft.device)
