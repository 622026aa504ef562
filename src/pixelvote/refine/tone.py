"""A tone prior: where a finding is darker (ultrasound lesions) or brighter (flames) than its surroundings.

A CAM says roughly where a finding is; its edges are blurred over a whole cell of the network's grid. Many
findings differ from the tissue or scene around them in brightness: a breast lesion is a dark (hypoechoic)
region of the scan, a flame a bright one in the frame. The local contrast of a pixel is
``(surroundings - pixel) / (surroundings + 0.05)`` on the grey image, the pixel lightly smoothed and its
surroundings a wide Gaussian blur (``sigma`` of the map's size); the tone map is its positive part for
``"dark"`` (its negative part for ``"bright"``), scaled to each image's maximum.

Which tone a finding has is learned from the image-level labels alone, as the colour prior is: the local
contrast of the finding-labelled training images, each pixel weighted by the ensemble's map there, is positive
on average where findings are darker than their surroundings (:func:`learn_tone`). The consensus combines
the tone map with the fused map as a weighted geometric mean, ``map^(1-w) * tone^w``
(``consensus.tone_weight``), after the colour prior where both are used; calibration chooses the weight on
the validation masks, or leaves the tone out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F

Tone = Literal["dark", "bright"]
SIGMA = 0.134  # the surroundings' Gaussian, as a fraction of the map's size (30 px at 224)
SMOOTH = 0.0134  # the pixel's own smoothing against speckle and noise (3 px at 224)
OFFSET = 0.05  # keeps the contrast of near-black surroundings finite
MIN_CONTRAST = 0.02  # an image whose strongest contrast is below this has none (it is not scaled up to 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x (B, H, W)`` (``sigma`` in px), edges replicated."""
    radius = max(1, min(int(3 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    g = torch.exp(-t.pow(2) / (2 * sigma * sigma))
    g = g / g.sum()
    y = F.pad(x.unsqueeze(1), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(y, g.view(1, 1, -1, 1)).squeeze(1)


def local_contrast(images: torch.Tensor, hw: tuple[int, int] | torch.Size | None = None,
                   sigma: float = SIGMA) -> torch.Tensor:
    """``images (B, 3, H, W)`` (uint8, or float in [0, 1]) -> each pixel's local contrast ``(B, h, w)`` in
    [-1, 1] at size ``hw`` (default the images'): positive where it is darker than its surroundings."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    grey = x.mean(1, keepdim=True)
    if hw is not None and tuple(grey.shape[-2:]) != tuple(hw):
        grey = F.interpolate(grey, size=tuple(hw), mode="area")
    grey = grey.squeeze(1)
    size = max(grey.shape[-2:])
    pixel = _blur(grey, max(0.5, SMOOTH * size))
    # the wide blur at a quarter of the size: the same surroundings (its Gaussian spans dozens of pixels)
    # for a sixteenth of the work
    step = max(1, min(4, int(sigma * size / 4)))
    small = F.avg_pool2d(grey.unsqueeze(1), step, ceil_mode=True).squeeze(1) if step > 1 else grey
    around = _blur(small, sigma * size / step)
    if step > 1:
        around = F.interpolate(around.unsqueeze(1), size=grey.shape[-2:], mode="bilinear",
                               align_corners=False).squeeze(1)
    return ((around - pixel) / (around + OFFSET)).clamp_(-1.0, 1.0)


def tone_map(images: torch.Tensor, tone: Tone, hw: tuple[int, int] | torch.Size | None = None,
             sigma: float = SIGMA) -> torch.Tensor:
    """How much darker (``tone="dark"``) or brighter than its surroundings each pixel is, ``(B, h, w)`` in
    [0, 1], 1 at each image's most contrasting pixel (near 0 everywhere in an image without any: below
    :data:`MIN_CONTRAST` it is not scaled up)."""
    c = local_contrast(images, hw, sigma)
    d = (c if tone == "dark" else -c).clamp_(min=0.0)
    return d / d.flatten(1).amax(1).clamp_min(MIN_CONTRAST).view(-1, 1, 1)


def tone_evidence(images: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor, background: int,
                  sigma: float = SIGMA) -> tuple[float, int]:
    """(sum, count) over the finding-labelled images of ``images (B, 3, S, S)`` with a map of any weight in
    ``maps (B, S, S)`` of their local contrast weighted by their maps: :func:`learn_tone` adds them up."""
    found = labels.cpu() != background
    if not bool(found.any()):
        return 0.0, 0
    w = maps.detach().cpu().float().clamp(0.0, 1.0)[found].flatten(1)
    c = local_contrast(images.cpu()[found], maps.shape[-2:], sigma).flatten(1)
    weight = w.sum(1)
    live = weight > 0
    return float(((c * w).sum(1)[live] / weight[live]).sum()), int(live.sum())


def learn_tone(evidence: Iterable[tuple[float, int]]) -> tuple[Tone | None, float]:
    """(the findings' tone, the mean local contrast under their maps) from :func:`tone_evidence`'s batches:
    ``"dark"`` where it is positive (darker than the surroundings), ``"bright"`` where negative; None where
    no finding-labelled image had a map, or the mean is exactly 0."""
    total, n = 0.0, 0
    for s, k in evidence:
        total, n = total + s, n + k
    if not n:
        return None, 0.0
    mean = total / n
    return ("dark" if mean > 0 else "bright" if mean < 0 else None), mean


def with_tone(soft: torch.Tensor, images: torch.Tensor, tone: Tone, weight: float,
              sigma: float = SIGMA) -> torch.Tensor:
    """The fused map ``soft (B, H, W)`` in [0, 1] combined with the tone map of ``images (B, 3, H', W')``:
    ``soft^(1-weight) * tone^weight`` (``weight`` 0 leaves it as it is)."""
    if weight <= 0:
        return soft
    t = tone_map(images.to(soft.device), tone, soft.shape[-2:], sigma)
    return soft.clamp(0.0, 1.0).pow(1.0 - weight) * t.pow(weight)
