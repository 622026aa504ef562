"""bench/ablation.py's stage two: which segmenter it trains (by encoder) or scores (a given folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pixelvote.engine.annotate as annotate_module
import pixelvote.segment.train as seg_train
from tests.conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _ablation():  # type: ignore[no-untyped-def]
    return load_bench("ablation")


@pytest.fixture()
def recorded(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A run folder with a split; annotate, segment train, calibration and loading recorded, not run."""
    run = tmp_path / "runs" / "busi"
    run.mkdir(parents=True)
    (run / "split.json").write_text(json.dumps({"train": ["/d/images/benign/a.png", "/d/images/normal/b.png"],
                                                "val": []}))
    calls: dict[str, list] = {"annotate": [], "train": [], "calibrate": [], "load": []}

    def fake_train(annot, out, *, run, cfg):  # type: ignore[no-untyped-def]
        calls["train"].append((Path(annot), Path(out), cfg))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "segmenter.json").write_text("{}")
        (Path(out) / "calibration.json").write_text("{}")

    monkeypatch.setattr(annotate_module, "annotate",
                        lambda run, csv, out, **kw: calls["annotate"].append((Path(out), kw)))
    monkeypatch.setattr(seg_train, "train_segmenter", fake_train)
    monkeypatch.setattr(seg_train, "calibrate_segmenter", lambda d, r: calls["calibrate"].append(Path(d)))
    monkeypatch.setattr(seg_train, "load_segmenter", lambda d: calls["load"].append(Path(d)) or ("m", "c"))
    return run, calls


def test_each_encoder_trains_its_own_segmenter_on_the_same_pseudo_masks(recorded):
    run, calls = recorded
    ab = _ablation()
    assert ab.stage_two(run, run.parent, 3, 224, "best") == ("m", "c")
    assert ab.stage_two(run, run.parent, 3, 224, "best", "efficientnet_lite2") == ("m", "c")
    (annot0, seg0, cfg0), (annot2, seg2, cfg2) = calls["train"]
    assert seg0.name == "busi-segmenter-labelled-best" and cfg0.encoder == "efficientnet_lite0"
    assert seg2.name == "busi-segmenter-labelled-best-efficientnet_lite2"
    assert cfg2.encoder == "efficientnet_lite2"
    assert annot0 == annot2 == run.parent / "busi-train-annotations-labelled-best"
    assert [kw["labels"] for _, kw in calls["annotate"]] == [True, True]
    assert (cfg0.epochs, cfg0.image_size) == (3, 224)
    # trained once: a second call only loads it
    ab.stage_two(run, run.parent, 3, 224, "best", "efficientnet_lite2")
    assert len(calls["train"]) == 2 and calls["load"][-1] == seg2


def test_a_given_segmenter_is_scored_as_it_is(recorded, tmp_path):
    run, calls = recorded
    ab = _ablation()
    seg = tmp_path / "seg2"
    seg.mkdir()
    (seg / "segmenter.json").write_text("{}")
    assert ab.stage_two(run, run.parent, 3, 224, "best", seg_dir=seg) == ("m", "c")
    # never trained, but its thresholds are chosen on the run's validation masks first
    assert calls["train"] == [] and calls["annotate"] == []
    assert calls["calibrate"] == [seg] and calls["load"] == [seg]


def test_a_folder_that_holds_no_segmenter_is_a_clear_error(recorded, tmp_path):
    run, calls = recorded
    with pytest.raises(SystemExit, match="no segmenter.json.*segment train --out"):
        _ablation().stage_two(run, run.parent, 3, 224, "best", seg_dir=tmp_path / "nothing")
    assert calls["train"] == [] and calls["load"] == []
