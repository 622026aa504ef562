"""Checkpoints that are truncated, tampered with, from another format version or another class list give
a clear CheckpointError naming the file, and nothing is ever unpickled (tests/test_checkpoint.py has the
basics)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixelvote.errors import CheckpointError, DataError
from pixelvote.models.checkpoint import (
    MemberConfig,
    RunConfig,
    load_run,
    member_file,
    save_run_config,
    save_weights,
)
from pixelvote.models.member import build_member

FILE = member_file(0, "tiny_cnn_a")


@pytest.fixture
def run(tmp_path) -> Path:
    save_weights(tmp_path / FILE, build_member("tiny_cnn_a", 2, pretrained=False))
    save_run_config(
        tmp_path,
        RunConfig(
            classes=["lesion", "normal"],
            background="normal",
            image_size=32,
            members=[MemberConfig(name="tiny_cnn_a", file=FILE)],
        ),
    )
    return tmp_path


def _error(run: Path, match: str, path: Path) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        load_run(run, device="cpu")
    assert str(path) in str(e.value) and e.value.fix, str(e.value)
    return str(e.value)


@pytest.mark.parametrize("cut", [0, 7, 8, 100, -1])
def test_truncated_weights_at_any_point(run, cut):
    f = run / FILE
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    _error(run, "corrupt or truncated", f)


def test_tampered_headers_and_tensors(run):
    f = run / FILE
    good = f.read_bytes()
    state = load_file(f)
    n = struct.unpack("<Q", good[:8])[0]
    f.write_bytes(struct.pack("<Q", 2**62) + good[8:])  # a header length that would allocate exabytes
    _error(run, "corrupt or truncated", f)
    f.write_bytes(good[:8] + b"{" * n + good[8 + n :])  # not JSON
    _error(run, "corrupt or truncated", f)
    renamed = {("fc.weight_x" if k == "fc.weight" else k): v for k, v in state.items()}
    save_file(renamed, str(f))
    assert "fc.weight" in _error(run, "do not fit tiny_cnn_a", f)
    save_file({**state, "fc.weight": torch.zeros(5, state["fc.weight"].shape[1])}, str(f))
    msg = _error(run, "do not fit tiny_cnn_a", f)
    assert "expected fc.weight of shape (2, 32) but got (5, 32)" in msg
    save_file({**state, "fc.bias": torch.full_like(state["fc.bias"], float("nan"))}, str(f))
    _error(run, "NaN or infinite", f)


def test_a_pickle_payload_is_never_executed(run, tmp_path_factory):
    marker = tmp_path_factory.mktemp("pwn") / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (run / FILE).write_bytes(pickle.dumps({"fc.weight": Payload()}))
    _error(run, "corrupt or truncated", run / FILE)
    torch.save({"fc.weight": Payload()}, run / FILE)  # a torch.save zip holding the same payload
    _error(run, "corrupt or truncated", run / FILE)
    assert not marker.exists()


def test_loading_a_run_unpickles_nothing(run, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    ens, cfg = load_run(run, device="cpu")
    assert cfg.classes == ["lesion", "normal"] and len(ens.members) == 1


@pytest.mark.parametrize("version, words", [(2, "newer pixelvote"), (0, "older"), ("1", "no format_version")])
def test_other_format_versions_name_run_json(run, version, words):
    raw = json.loads((run / "run.json").read_text())
    raw["format_version"] = version
    (run / "run.json").write_text(json.dumps(raw))
    _error(run, words, run / "run.json")


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '{"format_version": 1}', '{"format_version": 1, "classes": 3}']
)
def test_broken_run_json_names_it(run, text):
    (run / "run.json").write_text(text)
    _error(run, "run.json", run / "run.json")


def test_missing_member_file_is_named(run):
    (run / FILE).unlink()
    _error(run, "weights file is missing", run / FILE)


def test_run_whose_classes_differ_from_its_weights(run):
    raw = json.loads((run / "run.json").read_text())
    raw["classes"] = ["lesion", "normal", "other"]
    (run / "run.json").write_text(json.dumps(raw))
    msg = _error(run, "do not fit tiny_cnn_a with this run's 3 classes", run / FILE)
    assert "expected fc.weight of shape (3, 32) but got (2, 32)" in msg


def test_evaluate_data_whose_classes_the_run_does_not_know(tmp_path):
    from conftest import write_blob_dataset

    from pixelvote.evaluate.run import evaluate_run

    save_weights(tmp_path / "run" / FILE, build_member("tiny_cnn_a", 2, pretrained=False))
    save_run_config(
        tmp_path / "run",
        RunConfig(
            classes=["fire", "no_fire"],
            background="no_fire",
            image_size=32,
            members=[MemberConfig(name="tiny_cnn_a", file=FILE)],
        ),
    )
    data = write_blob_dataset(tmp_path / "data", per_class=2)  # classes lesion / normal
    with pytest.raises(DataError, match="class 'lesion', which the run does not know"):
        evaluate_run(tmp_path / "run", data, tmp_path / "eval", num_workers=0, progress=False)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_resume_with_data_whose_classes_changed(tmp_path, monkeypatch):
    from conftest import write_blob_dataset

    import pixelvote.train.loop as loop
    from pixelvote.train.config import TrainConfig

    data = write_blob_dataset(tmp_path / "data", per_class=4)
    cfg = TrainConfig(
        data=data,
        out=tmp_path / "run",
        preset="tiny",
        models=["tiny_cnn_a"],
        epochs=2,
        image_size=32,
        pretrained=False,
        mc_samples=2,
    )
    real, calls = loop.evaluate_member, {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate_member", interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    monkeypatch.setattr(loop, "evaluate_member", real)
    shutil.copytree(data / "images" / "lesion", data / "images" / "other")  # a class added meanwhile
    with pytest.raises(CheckpointError) as e:
        loop.train(cfg, resume=True)
    assert str(tmp_path / "run") in str(e.value)
