"""Crash safety: `annotate` and `train` killed with SIGKILL mid-run lose nothing and duplicate nothing when
they are run again; the result is the same as an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixelvote.cli import app
from pixelvote.models.checkpoint import load_run

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
runner = CliRunner()
TINY = ["--preset", "tiny", "--image-size", "32", "--no-pretrained", "--mc-samples", "2", "--quiet"]


def _cli(log: Path, *args: str) -> subprocess.Popen:
    """`python -m pixelvote.cli ARGS` in the background; its output goes to ``log`` (a pipe could fill up)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "pixelvote.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env
        )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            proc.kill()  # SIGKILL: no handler, no cleanup, no flush
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    raise AssertionError("the process never reached the point to kill it")


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n") if path.exists() else []


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (Linux /proc; empty elsewhere)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if text in (d / "cmdline").read_bytes().decode("utf-8", "replace"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _no_orphans(text: str, wait: float = 3.0) -> list[int]:
    """Wait for the killed run's decoding workers to end; kill (and return) any still alive after ``wait``."""
    deadline = time.monotonic() + wait
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    from test_reliability_cli import tiny_run

    _, data, run = tiny_run(tmp_path_factory)
    rng = np.random.default_rng(1)
    images = tmp_path_factory.mktemp("crash") / "images"
    images.mkdir()
    for i in range(40):
        img = (rng.random((96, 128)) * 80).astype(np.uint8)  # big enough to fill the workers' queue
        y, x = rng.integers(4, 70), rng.integers(4, 100)
        img[y : y + 16, x : x + 16] += 150
        Image.fromarray(img).save(images / f"img {i:02d}.png")
    return data, run, images


def test_annotate_killed_mid_run_resumes_to_the_uninterrupted_result(run_and_images, tmp_path):
    _, run, images = run_and_images
    args = ["--run", str(run), "--images", str(images), "--batch-size", "2", "--mc-samples", "4"]
    cut = tmp_path / "cut"
    log = tmp_path / "annotate.log"
    proc = _cli(log, "annotate", *args, "--out", str(cut), "--workers", "2")  # workers that could be orphaned
    manifest = cut / "annotations.jsonl"
    killed = _kill_when(proc, lambda: len(_lines(manifest)) > 3)  # a few images done (3 whole lines)
    done_at_kill = [ln for ln in _lines(manifest) if ln.strip()]
    if not killed or len(done_at_kill) >= 40:
        pytest.fail(f"annotate finished before it could be killed: {log.read_text()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL
    assert _no_orphans(str(cut)) == [], "decoding workers outlived the killed annotate"

    r = runner.invoke(app, ["annotate", *args, "--out", str(cut), "--workers", "0"])  # the re-run
    assert r.exit_code == 0, r.output
    full = tmp_path / "full"
    r = runner.invoke(app, ["annotate", *args, "--out", str(full), "--workers", "0"])
    assert r.exit_code == 0, r.output

    def records(out: Path) -> dict[str, dict]:
        recs = [json.loads(ln) for ln in _lines(out / "annotations.jsonl") if ln.strip()]
        keys = [rec["key"] for rec in recs]
        assert len(keys) == len(set(keys)) == 40, "each image exactly once"
        return {rec["key"]: rec for rec in recs}

    a, b = records(cut), records(full)
    assert a == b  # every field, not only the masks
    for key, rec in a.items():
        for kind in ("mask", "overlay", "uncertainty"):
            with Image.open(cut / rec[kind]) as im_a, Image.open(full / rec[kind]) as im_b:
                im_a.load()
                assert np.array_equal(np.asarray(im_a), np.asarray(im_b)), (key, kind)
    assert _lines(cut / "annotations.jsonl")[-1] == ""  # ends on a whole line
    stray = sorted(p.name for p in (cut / "masks").iterdir() if not p.name.startswith("."))
    assert stray == sorted(f"{k}.png" for k in a)


def test_train_killed_mid_training_resumes_to_the_same_epochs(run_and_images, tmp_path):
    data, _, _ = run_and_images
    args = ["--data", str(data), "--epochs", "2", "--seed", "3", *TINY]
    out = tmp_path / "cut"
    log = tmp_path / "train.log"
    proc = _cli(log, "train", *args, "--out", str(out))
    state = out / "checkpoint" / "state.json"

    def first_epoch_saved() -> bool:
        try:
            st = json.loads(state.read_text())
        except (OSError, ValueError):  # not there yet (it is written atomically, so never half-written)
            return False
        return any(m["epoch"] >= 1 for m in st["members"].values())

    killed = _kill_when(proc, first_epoch_saved, timeout=120)
    assert killed, f"training ended before it could be killed: {log.read_text()[-2000:]}"
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) < 4  # mid-training: 2 members x 2 epochs were not all done

    # README: `pixelvote train --out RUN --resume`; the CLI still requires --data (see the report)
    r = runner.invoke(app, ["train", "--out", str(out), "--resume", "--data", str(data), "--quiet"])
    assert r.exit_code == 0, r.output
    hist = json.loads((out / "history.json").read_text())
    assert [(h["member"], h["epoch"]) for h in hist] == [
        (m, e) for m in ("tiny_cnn_a", "tiny_cnn_b") for e in (1, 2)
    ]
    full = tmp_path / "full"
    r = runner.invoke(app, ["train", *args, "--out", str(full)])
    assert r.exit_code == 0, r.output
    ens_cut, cfg_cut = load_run(out, device="cpu")
    ens_full, cfg_full = load_run(full, device="cpu")
    assert cfg_cut.classes == cfg_full.classes and len(ens_cut.members) == 2
    for ma, mb in zip(ens_cut.members, ens_full.members, strict=True):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
            assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


def test_train_killed_between_checkpoint_files_resumes_exactly(tmp_path, monkeypatch):
    from conftest import write_blob_dataset

    import pixelvote.train.loop as loop
    from pixelvote.train.config import TrainConfig

    data = write_blob_dataset(tmp_path / "data", per_class=4)

    def cfg(out: Path) -> TrainConfig:
        return TrainConfig(
            data=data,
            out=out,
            preset="tiny",
            models=["tiny_cnn_a"],
            epochs=2,
            image_size=32,
            pretrained=False,
            mc_samples=2,
            batch_size=8,
            patience=10,
        )

    loop.train(cfg(tmp_path / "full"))
    real = loop.write_json_atomic
    calls = {"state": 0}

    def killed_before_state(path, obj):
        if Path(path).name == "state.json":
            calls["state"] += 1
            if calls["state"] == 2:  # the process dies after epoch 2's weights + history, before its state
                raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(loop, "write_json_atomic", killed_before_state)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg(tmp_path / "cut"))
    monkeypatch.setattr(loop, "write_json_atomic", real)
    loop.train(cfg(tmp_path / "cut"), resume=True)
    hist = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    a, _ = load_run(tmp_path / "full")
    b, _ = load_run(tmp_path / "cut")
    for va, vb in zip(a.members[0].state_dict().values(), b.members[0].state_dict().values(), strict=True):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5)
