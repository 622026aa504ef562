"""Batch-norm folding for inference: same outputs, fewer ops, and it never folds what it must not."""

from __future__ import annotations

import torch
from torch import nn

from pixelvote.explain.analyze import analyze
from pixelvote.models.ensemble import Ensemble
from pixelvote.models.fold import fold_batchnorm
from pixelvote.models.member import build_member


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_efficientnet_lite_folds_and_keeps_its_outputs() -> None:
    torch.manual_seed(0)
    member = build_member("efficientnet_lite0", 2, pretrained=False).eval()
    _randomise_bn(member.backbone)
    x = torch.rand(2, 3, 64, 64)
    folded, n = fold_batchnorm(member.backbone, x[:1], keep={member.cam_layer})
    assert n >= 30  # stem, every block's convs, head
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert n_bn == sum(isinstance(m, nn.BatchNorm2d) for m in member.backbone.modules()) - n
    with torch.no_grad():
        assert torch.allclose(folded(x), member.backbone(x), atol=1e-4, rtol=1e-4)


def test_annotation_maps_match_the_unfolded_ensemble() -> None:
    torch.manual_seed(0)
    members = [build_member("efficientnet_lite0", 2, pretrained=False).eval()]
    _randomise_bn(members[0].backbone)
    plain = Ensemble(members, ["lesion", "normal"], "normal", 64).eval()
    imgs = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    a = analyze(plain, imgs, mc_samples=4, seeds=[1, 2, 3])
    folded_members = [build_member("efficientnet_lite0", 2, pretrained=False).eval()]
    folded_members[0].load_state_dict(members[0].state_dict())
    folded = Ensemble(folded_members, ["lesion", "normal"], "normal", 64).eval()
    assert folded.fold_batchnorm() >= 30
    b = analyze(folded, imgs, mc_samples=4, seeds=[1, 2, 3])
    assert torch.equal(a.label, b.label)
    assert torch.allclose(a.probs, b.probs, atol=1e-4)
    assert torch.allclose(a.maps, b.maps, atol=1e-3)


class _Shared(nn.Module):
    """conv -> bn, but the conv's output is also added back: folding it would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.relu(self.bn(y)) + y


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_conv_output_read_elsewhere_is_refused_by_the_check() -> None:
    model = _Shared().eval()
    _randomise_bn(model)
    x = torch.rand(1, 3, 8, 8)
    out, n = fold_batchnorm(model, x)
    assert n == 0 and out is model  # the functional "+ y" is invisible to hooks; the output check catches it


def test_kept_layers_are_not_folded() -> None:
    model = _Plain().eval()
    _randomise_bn(model)
    x = torch.rand(1, 3, 8, 8)
    _, n = fold_batchnorm(model, x, keep={"conv"})
    assert n == 0
    folded, n = fold_batchnorm(model, x)
    assert n == 1 and isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the original is untouched


import pytest  # noqa: E402


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite0_os16"])
def test_paper_backbones_fold_every_conv_bn_pair_exactly(name: str) -> None:
    """DenseNet concatenates and runs norm -> relu -> conv, ResNet adds: only true conv -> BN pairs fold
    (channel counts must match, or the folded weights could not even be built)."""
    torch.manual_seed(0)
    member = build_member(name, 2, pretrained=False).eval()
    _randomise_bn(member.backbone)
    x = torch.rand(1, 3, 64, 64)
    folded, n = fold_batchnorm(member.backbone, x, keep={member.cam_layer})
    assert n > 10
    with torch.no_grad():
        ref = member.backbone(x)
        assert torch.allclose(folded(x), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
