"""Turning decoded images into model inputs: a fixed resize for inference, light augmentation for training."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, H, W) uint8`` tensor with the array's channels-last layout: no transpose
    (the resize reads that layout directly, 5x faster than after a transpose), and a copy only of a
    read-only (or flipped, strided) array."""
    ok = image.flags.writeable and image.flags.c_contiguous and image.dtype == np.uint8
    arr = image if ok else np.array(image, dtype=np.uint8, order="C")
    return torch.from_numpy(arr).permute(2, 0, 1)


def resize_uint8(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``(C, H, W) uint8`` -> ``(C, h, w) uint8``, antialiased bilinear (plain bilinear when enlarging).

    On a CPU torch resizes uint8 directly, about 50 times faster than through float for a large photo
    (1 against 47 ms per image on this project's 2-core machine) and within 1 level of it."""
    x = image.unsqueeze(0)
    if x.device.type == "cpu":
        y = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        return y.squeeze(0).contiguous()
    y = F.interpolate(x.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(3, H, W) uint8`` -> ``(3, size, size) uint8`` (squash, antialiased bilinear)."""
    return resize_uint8(image, (size, size))


def resize_mask(mask: np.ndarray, size: int, mode: str = "squash") -> torch.Tensor:
    """``(H, W) bool`` -> ``(size, size) bool`` (area-weighted, then > 0.5), placed as :func:`fit_image`
    places its image."""
    top, left, h, w = content_box(mask.shape[:2], size, mode)
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    y = F.interpolate(x, size=(h, w), mode="area")[0, 0] > 0.5
    if (h, w) == (size, size):
        return y
    out = torch.zeros(size, size, dtype=torch.bool)
    out[top:top + h, left:left + w] = y
    return out


RESIZE_MODES = ("squash", "letterbox")
# letterbox padding: the ImageNet mean colour, which every member's normalisation takes to about zero
_PAD = (124, 116, 104)


def content_box(hw: tuple[int, int], size: int, mode: str = "squash") -> tuple[int, int, int, int]:
    """Where an ``hw = (H, W)`` image lies in its ``size x size`` model input: ``(top, left, height, width)``.
    ``squash`` stretches it over the whole square; ``letterbox`` keeps its aspect ratio, scales its longer
    side to ``size`` and centres it (the rest is padding)."""
    if mode == "squash":
        return 0, 0, size, size
    if mode != "letterbox":
        from pixelvote.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown resize mode: {did_you_mean(mode, list(RESIZE_MODES))}")
    H, W = int(hw[0]), int(hw[1])
    scale = size / max(H, W)
    h, w = max(1, min(size, round(H * scale))), max(1, min(size, round(W * scale)))
    return (size - h) // 2, (size - w) // 2, h, w


def fit_image(image: torch.Tensor, size: int, mode: str = "squash") -> torch.Tensor:
    """``(3, H, W) uint8`` -> the ``(3, size, size) uint8`` model input, by ``mode`` (see
    :func:`content_box`)."""
    if mode == "squash":
        return resize_image(image, size)
    top, left, h, w = content_box(tuple(image.shape[-2:]), size, mode)
    out = torch.tensor(_PAD, dtype=torch.uint8, device=image.device).view(3, 1, 1).repeat(1, size, size)
    out[:, top:top + h, left:left + w] = resize_uint8(image, (h, w))
    return out


def crop_content(maps: torch.Tensor, hw: tuple[int, int], mode: str = "squash") -> torch.Tensor:
    """Maps ``(..., S, S)`` on a model input -> the part that covers the ``hw`` image (all of it when
    squashed), ready to be resized to ``hw``."""
    if mode == "squash":
        return maps
    top, left, h, w = content_box(hw, int(maps.shape[-1]), mode)
    return maps[..., top:top + h, left:left + w]


AUGMENTATIONS = ("standard", "robust")


def train_augment(size: int, kind: str = "standard"):  # type: ignore[no-untyped-def]
    """Augmentation for fine-tuning on uint8 tensors. ``standard``: crop, flip, small rotation, colour.
    ``robust`` adds what differs between cameras and sources rather than between classes, so that a
    classifier cannot tell the class by it: wider crops and aspect changes, blur (focus, resolution) and JPEG
    re-compression (one source's compression artefacts)."""
    from torchvision.transforms import v2

    if kind not in AUGMENTATIONS:
        from pixelvote.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown augmentation: {did_you_mean(kind, list(AUGMENTATIONS))}")
    robust = kind == "robust"
    steps = [
        v2.RandomResizedCrop(size, scale=(0.4, 1.0) if robust else (0.6, 1.0),
                             ratio=(0.6, 1.67) if robust else (0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomRotation(10)], p=0.5),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.02) if robust
        else v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
    ]
    if robust:
        steps += [v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3),
                  v2.RandomApply([JPEGRecompress((30, 95))], p=0.5)]
    return v2.Compose(steps)


class JPEGRecompress(torch.nn.Module):
    """Encode a ``(3, H, W) uint8`` image as JPEG at a random quality and decode it again (with PIL: the
    encoder in torchvision.io is deprecated). Draws from torch's generator, so it follows the seed."""

    def __init__(self, quality: tuple[int, int] = (30, 95)) -> None:
        super().__init__()
        self.quality = quality

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        import io

        from PIL import Image

        q = int(torch.randint(self.quality[0], self.quality[1] + 1, ()).item())
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=q)
        out = np.asarray(Image.open(buf).convert("RGB"))
        return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()


def seg_augment(size: int):  # type: ignore[no-untyped-def]
    """Joint augmentation for the segmenter: ``(image uint8 (3,S,S), maps (C,S,S) float)`` -> the same, with
    the image's crop, flip and rotation applied to the maps by nearest neighbour (pixels rotated in from
    outside get 0: for a loss-weight map, ignored) and the colour jitter to the image only."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    pipeline = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomRotation(10)], p=0.5),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])

    def apply(image: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = pipeline(tv_tensors.Image(image), tv_tensors.Mask(maps))
        return img.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)

    return apply
