"""The guided filter's box mean: O(1) per pixel and equal to the plain windowed mean, edges included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelvote.refine.guided import _box, guided_filter


@pytest.mark.parametrize("r", [1, 3, 9])
def test_box_mean_matches_avg_pool_without_padding(r: int) -> None:
    x = torch.rand(2, 1, 23, 31, generator=torch.Generator().manual_seed(r))
    ref = F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
    assert torch.allclose(_box(x, r), ref, atol=1e-5)


def test_box_window_larger_than_the_image_is_the_global_mean() -> None:
    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(_box(x, 50), x.mean().expand_as(x), atol=1e-5)


def test_guided_filter_keeps_a_constant_map_and_follows_edges() -> None:
    guide = torch.zeros(1, 32, 32)
    guide[:, :, 16:] = 1.0  # a vertical edge
    flat = torch.full((1, 1, 32, 32), 0.7)
    assert torch.allclose(guided_filter(flat, guide, 4, 1e-3), flat, atol=1e-4)
    blob = torch.zeros(1, 1, 32, 32)
    blob[..., 12:] = 1.0  # a map whose edge is 4 px off the image's
    out = guided_filter(blob, guide, 4, 1e-4)[0, 0]
    steps = out[0, 1:] - out[0, :-1]
    assert int(steps.argmax()) == 15  # the map's sharpest step moved from column 12 to the image's edge (16)
    assert float(steps[15]) > 0.2 and float(steps[11]) < 0.15
