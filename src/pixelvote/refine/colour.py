"""A colour prior learned from image-level labels: P(finding | a pixel's colour).

The CAM says roughly where a finding is; on data where findings have a colour of their own (flames) it says
little about which pixels are the finding. Every training image carries a label, so the colours of the
finding can be learned without a single mask: a colour histogram of the finding-labelled images, each pixel
weighted by the ensemble's map there (where the models see the finding), against the histogram of the
background-labelled images (every pixel). Each image counts once, whatever its size; the two classes count
alike. The prior is ``h_finding / (h_finding + h_background)`` per colour bin (0.5 for colours neither has).

The consensus combines it with the fused map as a weighted geometric mean, ``map^(1-w) * prior^w``
(``consensus.colour_weight``): the map keeps its say where the finding is, the prior where its edges run.
Where colour tells nothing (grey ultrasound) calibration does not choose it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

BINS = 8  # per channel: 512 colours; 8, 16 and 32 gave the same masks on fire (docs/results.md)


class ColourPrior(BaseModel):
    """P(finding | colour) over ``bins``^3 RGB bins (index ``(r * bins + g) * bins + b`` of ``value // (256 //
    bins)``), learned on ``images`` training images (``findings`` of them labelled with a finding)."""

    model_config = ConfigDict(extra="forbid")

    bins: int = Field(BINS, ge=2, le=64)
    probability: list[float]
    images: int = Field(0, ge=0)
    findings: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> ColourPrior:
        # a ValueError, so that reading run.json names the file and the field
        again = "; re-run `pixelvote train` to learn it again"
        if 256 % self.bins:
            raise ValueError(f"{self.bins} colour bins per channel do not divide 256{again}")
        if len(self.probability) != self.bins ** 3:
            raise ValueError(f"{len(self.probability)} values for {self.bins}^3 colour bins{again}")
        if any(not 0.0 <= p <= 1.0 for p in self.probability):
            raise ValueError(f"colour probabilities outside [0, 1]{again}")
        return self

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.probability, dtype=torch.float32, device=device)


def colour_bins(images: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """``images (B, 3, H, W)`` (uint8, or float in [0, 1]) -> each pixel's colour bin ``(B, H, W)``."""
    x = images if images.dtype == torch.uint8 else (images * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    q = (x >> (256 // bins).bit_length() - 1).long()  # bins divide 256: a power of two, so a shift
    return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]


def learn_colour_prior(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], background: int,
                       bins: int = BINS) -> ColourPrior | None:
    """The prior from ``(images (B, 3, S, S), labels (B,), maps (B, S, S) in [0, 1])`` batches: ``maps``
    weight the pixels of finding-labelled images (the ensemble's fused map of the labelled class); the
    pixels of background-labelled images all count. None when either class has no image (or no finding map
    has any weight): there is nothing to tell the finding's colours from."""
    n = bins ** 3
    finding = torch.zeros(n, dtype=torch.float64)
    rest = torch.zeros(n, dtype=torch.float64)
    images = findings = backgrounds = 0
    for imgs, labels, maps in batches:
        idx = colour_bins(imgs.cpu(), bins).flatten(1)
        w = maps.detach().cpu().double().clamp_min(0.0).flatten(1)
        for j in range(len(labels)):
            images += 1
            if int(labels[j]) == background:
                rest += torch.bincount(idx[j], minlength=n).double() / idx.shape[1]
                backgrounds += 1
            elif float(w[j].sum()) > 0:
                finding += torch.bincount(idx[j], weights=w[j], minlength=n) / w[j].sum()
                findings += 1
    if not findings or not backgrounds:
        return None
    pf, pb = finding / finding.sum(), rest / rest.sum()
    eps = 1e-6
    prob = (pf + eps) / (pf + pb + 2 * eps)
    return ColourPrior(bins=bins, probability=[round(float(p), 4) for p in prob], images=images,
                       findings=findings)


def with_colour(soft: torch.Tensor, images: torch.Tensor, prior: ColourPrior, weight: float) -> torch.Tensor:
    """The fused map ``soft (B, H, W)`` in [0, 1] combined with the colour prior of ``images (B, 3, H, W)``:
    ``soft^(1-weight) * prior^weight`` (``weight`` 0 leaves it as it is)."""
    if weight <= 0:
        return soft
    p = prior.table(soft.device)[colour_bins(images.to(soft.device), prior.bins)]
    return soft.clamp(0.0, 1.0).pow(1.0 - weight) * p.pow(weight)
