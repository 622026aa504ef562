"""Turning decoded images into model inputs: a fixed resize for inference, light augmentation for training."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, H, W) uint8`` tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(3, H, W) uint8`` -> ``(3, size, size) uint8`` (squash, antialiased bilinear)."""
    x = image.unsqueeze(0).float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W) bool`` -> ``(size, size) bool`` (area-weighted, then > 0.5)."""
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    y = F.interpolate(x, size=(size, size), mode="area")
    return (y[0, 0] > 0.5)


def train_augment(size: int):  # type: ignore[no-untyped-def]
    """Standard augmentation for fine-tuning on uint8 tensors (crop, flip, small rotation, colour)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomRotation(10)], p=0.5),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
    ])


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
