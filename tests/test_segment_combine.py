"""`segment combine`: segmenters trained apart become one whose probability is their mean."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from pixelvote import cli
from pixelvote.cli import app
from pixelvote.errors import CheckpointError, ConfigError
from pixelvote.segment.combine import combine_segmenters
from pixelvote.segment.model import SegmenterEnsemble
from pixelvote.segment.train import SegConfig, load_segmenter, predict, train_segmenter
from tests.test_segment import _out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("combine")
    out = _out(root)
    segs = [train_segmenter(out, root / f"seg{seed}", cfg=SegConfig(epochs=1, image_size=64, batch_size=4,
                                                                      seed=seed, crf=False),
                            pretrained=False, device="cpu")
            for seed in (0, 1)]
    other = train_segmenter(out, root / "seg96",
                            cfg=SegConfig(epochs=1, image_size=96, batch_size=4, crf=False),
                            pretrained=False, device="cpu")
    return root, segs, other


def test_the_combination_predicts_the_mean_of_its_members(trained, tmp_path):
    _, (a, b), _ = trained
    combined = combine_segmenters([a, b], tmp_path / "both")
    model, cfg = load_segmenter(combined, device="cpu")
    assert isinstance(model, SegmenterEnsemble) and len(model.members) == 2
    assert [m.source for m in cfg.members] == [str(a.resolve()), str(b.resolve())]
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    pa, pb = (predict(load_segmenter(s, device="cpu")[0], x) for s in (a, b))
    assert not torch.allclose(pa, pb, atol=1e-3)  # two seeds: two different segmenters
    assert torch.allclose(predict(model, x), (pa + pb) / 2, atol=1e-5)
    # at another size too, as an ensemble's input reaches it
    x48 = torch.randint(0, 255, (1, 3, 48, 48), dtype=torch.uint8)
    assert predict(model, x48).shape == (1, 48, 48)


def test_without_a_run_the_thresholds_stay_and_the_reason_is_saved(trained, tmp_path):
    _, (a, b), _ = trained
    combined = combine_segmenters([a, b], tmp_path / "both")
    cfg = json.loads((combined / "segmenter.json").read_text())
    assert cfg["threshold"] == 0.5 and cfg["crf_iterations"] is None
    assert "pass --run" in json.loads((combined / "calibration.json").read_text())["source"]


def test_segmenters_that_cannot_be_averaged_are_a_clear_error(trained, tmp_path):
    root, (a, b), other = trained
    with pytest.raises(ConfigError, match="image_size 96.*cannot be averaged"):
        combine_segmenters([a, other], tmp_path / "x")
    with pytest.raises(ConfigError, match="at least two"):
        combine_segmenters([a], tmp_path / "x")
    with pytest.raises(ConfigError, match="would be overwritten"):
        combine_segmenters([a, b], a)
    with pytest.raises(CheckpointError, match="no segmenter.json"):
        combine_segmenters([a, root / "nothing"], tmp_path / "x")
    both = combine_segmenters([a, b], tmp_path / "both")
    with pytest.raises(ConfigError, match="already a combination"):
        combine_segmenters([both, a], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_segment_combine_command(trained, tmp_path, monkeypatch, capsys):
    root, (a, b), other = trained
    res = CliRunner().invoke(app, ["segment", "combine", str(a), str(b), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "2 segmenters combined" in res.output and (tmp_path / "c" / "segmenter.safetensors").exists()
    # through the entry point: bad input is exit code 2 and one line naming the folder, not a traceback
    monkeypatch.setattr(sys, "argv", ["pixelvote", "segment", "combine", str(a), str(other), "--out",
                                      str(tmp_path / "d")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot be averaged" in err and str(other) in err
    assert "Traceback" not in err


def test_segment_train_members_trains_each_seed_and_combines_them(tmp_path, monkeypatch):
    import pixelvote.segment.train as seg_train
    from pixelvote.segment.combine import train_combined

    out = _out(tmp_path)
    cfg = SegConfig(epochs=1, image_size=64, batch_size=4, crf=False, seed=5)
    combined = train_combined(out, tmp_path / "segs", 2, cfg=cfg, pretrained=False, device="cpu")
    seeds = [json.loads((combined / f"member-{i}" / "segmenter.json").read_text())["seed"] for i in (0, 1)]
    assert seeds == [5, 6]
    model, scfg = load_segmenter(combined, device="cpu")
    assert isinstance(model, SegmenterEnsemble) and len(scfg.members) == 2
    # the combination is there: not trained or combined again over it
    trained_again = []
    real = seg_train.train_segmenter
    monkeypatch.setattr(seg_train, "train_segmenter",
                        lambda a, folder, **kw: trained_again.append(folder.name) or real(a, folder, **kw))
    with pytest.raises(CheckpointError, match="a segmenter already exists here") as err:
        train_combined(out, tmp_path / "segs", 2, cfg=cfg, pretrained=False, device="cpu")
    assert "choose another --out" in str(err.value) and trained_again == []
    # interrupted after the first member (nothing combined yet): only the second is trained again
    (combined / "member-1" / "segmenter.json").unlink()
    (combined / "segmenter.json").unlink()
    train_combined(out, tmp_path / "segs", 2, cfg=cfg, pretrained=False, device="cpu")
    assert trained_again == ["member-1"]
    assert len(load_segmenter(combined, device="cpu")[1].members) == 2
    with pytest.raises(ConfigError, match="at least two members"):
        train_combined(out, tmp_path / "one", 1, cfg=cfg, pretrained=False, device="cpu")


def test_segment_train_members_through_the_cli(tmp_path):
    out = _out(tmp_path)
    args = ["segment", "train", "--annotations", str(out), "--out", str(tmp_path / "segs"), "--epochs", "1",
            "--image-size", "64", "--batch-size", "4", "--no-pretrained", "--no-crf", "--members", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "segmenter saved to" in res.output
    assert len(load_segmenter(tmp_path / "segs", device="cpu")[1].members) == 2
    res = CliRunner().invoke(app, [*args, "--no-calibrate"])
    assert res.exit_code == 2 and "--no-calibrate" in res.output
