"""The per-image files of `annotate`: what they hold and how they are encoded."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pixelvote.engine.render import contour, encode_outputs, output_paths, overlay


def _case(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)  # smooth, like photos
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:50] = True
    heat = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    unc = np.full((h, w), 0.25, np.float32)
    return image, mask, heat, unc


def test_paths_name_png_masks_and_jpeg_overlays() -> None:
    assert output_paths("case (1)") == {"mask": "masks/case (1).png", "overlay": "overlays/case (1).jpg",
                                        "uncertainty": "uncertainty/case (1).png"}


def test_encoded_files_decode_to_the_arrays() -> None:
    image, mask, heat, unc = _case()
    files = encode_outputs(image, mask, heat, unc)
    assert list(files) == ["mask", "overlay", "uncertainty"]
    assert all(Image.open(io.BytesIO(files[k])).mode == "L" for k in ("mask", "uncertainty"))  # 8-bit grey
    m = np.asarray(Image.open(io.BytesIO(files["mask"])))
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 255}
    assert np.array_equal(m == 255, mask)  # lossless
    u = np.asarray(Image.open(io.BytesIO(files["uncertainty"])))
    assert np.all(u == 64)  # 0.25 * 255 rounded
    smooth = (heat * 255).astype(np.uint8)  # levels vary along and across rows: lossless all the same
    u = np.asarray(Image.open(io.BytesIO(encode_outputs(image, mask, heat, smooth)["uncertainty"])))
    assert np.array_equal(u, smooth)
    ov = Image.open(io.BytesIO(files["overlay"]))
    assert ov.format == "JPEG" and ov.mode == "RGB" and ov.size == (60, 40)
    # lossy, but close to the picture it encodes
    diff = np.abs(np.asarray(ov).astype(int) - overlay(image, heat, mask).astype(int))
    assert diff.mean() < 12


def test_overlay_blends_heat_and_draws_the_contour_green() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    heat = np.ones((20, 20), np.float32)  # top of the colour map (inferno: pale yellow)
    out = overlay(image, heat, mask, alpha=0.5)
    edge = contour(mask)
    assert np.all(out[edge] == (0, 255, 0))
    inside = out[~edge & mask]
    assert np.all(inside[:, 0] > 100) and np.all(inside[:, 0] < 140)  # half of ~252 red
    assert np.array_equal(overlay(image, np.zeros_like(heat), np.zeros_like(mask), alpha=0.0), image)


def _contour_by_shifts(mask: np.ndarray, width: int) -> np.ndarray:
    """The definition: mask pixels with a 4-neighbour outside the mask (or the image), peeled ``width``
    times."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def test_contour_is_the_mask_pixels_next_to_the_outside_at_any_width() -> None:
    rng = np.random.default_rng(3)
    for shape, width in [((31, 47), 1), ((31, 47), 2), ((64, 40), 3), ((5, 9), 1)]:
        blobs = rng.random(shape) < 0.6
        full = np.ones(shape, bool)  # every pixel: only the image's border is outside
        for mask in (blobs, full, ~full):
            got = contour(mask, width)
            assert got.dtype == bool and got.shape == shape
            assert np.array_equal(got, _contour_by_shifts(mask, width)), (shape, width)
    assert contour(np.ones((9, 9), bool))[0].all() and not contour(np.ones((9, 9), bool))[4, 4]


def test_maps_are_resized_as_levels_within_one_level_of_the_float_resize() -> None:
    import torch
    import torch.nn.functional as F

    from pixelvote.data.transforms import resize_uint8
    from pixelvote.engine.render import to_levels

    maps = torch.rand(2, 1, 7, 7)
    maps = F.interpolate(maps, size=(56, 56), mode="bilinear", align_corners=False)[:, 0]
    maps[0, 0, 0] = 1.7  # uncertainty can exceed 1: saturates at 255
    levels = to_levels(maps.clamp(0, 1))
    assert levels.dtype == torch.uint8 and int(levels[0, 0, 0]) == 255
    up = resize_uint8(levels, (123, 91))
    ref = F.interpolate(maps.clamp(0, 1)[None] * 255, size=(123, 91), mode="bilinear", align_corners=False)[0]
    assert up.shape == (2, 123, 91) and up.dtype == torch.uint8
    assert float((up.float() - ref).abs().max()) <= 1.5  # quantised before, and rounded after, the resize


def test_overlay_takes_levels_or_floats_alike() -> None:
    image, mask, heat, _ = _case()
    levels = np.clip(heat * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(overlay(image, heat, mask), overlay(image, levels, mask))
