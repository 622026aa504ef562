"""bench/cross_video.py on a tiny run: a choice made on the validation group, on the other groups and on
each group alone, scored on every group calibration never saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import load_bench, write_blob_dataset

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "cross_video"):  # type: ignore[no-untyped-def]
    return load_bench(name)


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    root = tmp_path_factory.mktemp("cross_video")
    data = write_blob_dataset(root / "data", per_class=12)
    run = train(TrainConfig(data=data, out=root / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, map_candidates=[], colour_weights=[]))
    # as --train-exclude leaves them: a few lesion images of the training side, kept out (and masked)
    lists = json.loads((run / "split.json").read_text())
    lesions = [p for p in lists["train"] if "/lesion/" in p.replace("\\", "/")]
    lists["excluded_from_training"] = lesions[:4]
    (run / "split.json").write_text(json.dumps(lists))
    config = json.loads((run / "train_config.json").read_text())
    config["group_pattern"] = r"^(\w+ \d)"  # "lesion 1", "lesion 10" and "lesion 11" are one group
    (run / "train_config.json").write_text(json.dumps(config))
    return run, lists


def test_choices_are_scored_per_group_and_over_the_unseen_ones(grouped_run, capsys, tmp_path) -> None:
    run, lists = grouped_run
    args = ["--run", str(run), "--recipes", "plain", "--crf-weights", "", "--colour-weights", "",
            "--tables", str(tmp_path / "tables.pt")]
    _bench().main(args)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _bench().main(args)  # the kept tables give the same figures
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    _bench().main([*args, "--choose-per-group", "1"])  # chosen on one image per group, every image scored
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["images"] == out["images"]
    alone = "best for this group alone"
    assert all(one["per_group"][g][alone] == out["per_group"][g][alone] for g in out["groups"])
    val_lesions = [p for p in lists["val"] if "/lesion/" in p.replace("\\", "/")]
    assert out["images"] == len(val_lesions) + 4
    names = {Path(p).stem for p in lists["excluded_from_training"]}
    unseen = {n[: len("lesion x")] for n in names} - {Path(p).stem[: len("lesion x")] for p in val_lesions}
    assert set(out["unseen"]) == unseen and unseen
    for g in out["groups"]:
        row = out["per_group"][g]
        # nothing chosen elsewhere beats the choice made on the group itself
        assert row["best for this group alone"] >= row["chosen on validation"] - 1e-6
        assert row["best for this group alone"] >= row["chosen on the other groups"] - 1e-6
        assert 0.0 <= row["chosen on validation"] <= 1.0
    summary = out["unseen_mean_iou"]
    assert summary["best for this group alone"] >= summary["chosen on validation"] - 1e-6


def test_a_run_without_kept_out_images_is_refused(grouped_run, tmp_path) -> None:
    run, lists = grouped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "split.json").write_text(json.dumps({**lists, "excluded_from_training": []}))
    with pytest.raises(SystemExit, match="no masked images outside validation"):
        _bench().main(["--run", str(copy), "--recipes", "plain", "--crf-weights", ""])


def test_video_folds_calibrate_on_some_kept_out_groups_and_score_the_others(grouped_run, capsys,
                                                                            tmp_path) -> None:
    run, lists = grouped_run
    kept = sorted(Path(p).stem for p in lists["excluded_from_training"])
    groups = sorted({k[: len("lesion x")] for k in kept})
    _bench("video_folds").main(["--run", str(run), "--folds", groups[0], "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (fold,) = out["folds"]
    assert fold["calibrated_on"] == [groups[0]]
    others = [k for k in kept if k[: len("lesion x")] != groups[0]]
    assert fold["scored_images"] == len(others) and out["mean_iou_unseen"] == fold["mean_iou"]
    assert set(fold["per_group"]) == {k[: len("lesion x")] for k in others}
    fold_run = tmp_path / f"{run.name}-fold1"
    calibration = json.loads((fold_run / "calibration.json").read_text())
    assert calibration["masks_from"]["kept_out_of_training"] == len(kept) - len(others)
    assert "selection" not in calibration  # the run's own settings: no map recipe to choose
    with pytest.raises(SystemExit, match="unknown group"):
        _bench("video_folds").main(["--run", str(run), "--folds", "nope", "--out", str(tmp_path)])
    # settings overridden for calibration: a recipe to choose, with and without the tone prior
    for name, extra in (("tone", []), ("no-tone", ["--set", "tone_weights=[]"])):
        _bench("video_folds").main(["--run", str(run), "--folds", groups[0], "--out", str(tmp_path / name),
                                    "--set", 'map_candidates=["plain"]',
                                    "--set", 'refine_candidates=["none"]', *extra])
        calibration = json.loads((tmp_path / name / f"{run.name}-fold1" / "calibration.json").read_text())
        assert set(calibration["selection"]["candidates"]) >= {"plain+mean", "plain+intersection"}
        tried = any("tone" in k for k in calibration["selection"]["candidates"])
        assert tried is ("tone" in calibration) is (name == "tone")
    for bad in ("tone_weights", "no_such_field=1", "tone_weights=[0.5", "crf_recipes=0",
                "crf_weights=[]"):
        with pytest.raises(SystemExit, match="--set"):
            _bench("video_folds").main(["--run", str(run), "--folds", groups[0], "--set", bad])


def test_colour_priors_of_other_bin_counts_are_scored_beside_the_runs(grouped_run, tmp_path) -> None:
    from pixelvote.models.checkpoint import load_run, read_run_config, save_run_config

    run, _ = grouped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    bench = _bench()
    ens, cfg = load_run(copy)
    own = bench.learned_priors(copy, ens, cfg, 4)[0]
    assert own is not None and own.bins == 4 and own.images == len(json.loads(
        (copy / "split.json").read_text())["train"])
    saved = read_run_config(copy)
    saved.consensus = saved.consensus.model_copy(update={"colour_prior": own})
    save_run_config(copy, saved)
    tables = tmp_path / "tables.pt"
    bench.main(["--run", str(copy), "--recipes", "plain", "--crf-weights", "", "--colour-weights", "1",
                "--colour-bins", "4,8", "--tables", str(tables)])
    ious = torch.load(tables)["ious"]
    # the run's own bin count is its prior; only the other one is learned again and scored beside it
    assert set(ious) == {"plain|intersection", "plain|mean", "plain|mean*colour:1", "plain/b8|mean*colour:1"}
    assert ious["plain/b8|mean*colour:1"].shape == ious["plain|mean*colour:1"].shape
    assert not torch.equal(ious["plain/b8|mean*colour:1"], ious["plain|mean*colour:1"])


def test_tone_fusions_are_scored_with_the_tone_learned_as_train_learns_it(grouped_run, tmp_path) -> None:
    from pixelvote.models.checkpoint import load_run, read_run_config

    run, _ = grouped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    bench = _bench()
    assert read_run_config(copy).consensus.tone is None  # as a run calibrated before tones were learned
    ens, cfg = load_run(copy)
    prior, tone, mean = bench.learned_priors(copy, ens, cfg, 8, colour=False, tone=True)
    assert prior is None and tone == ("dark" if mean > 0 else "bright")
    tables = tmp_path / "tables.pt"
    bench.main(["--run", str(copy), "--recipes", "plain", "--crf-weights", "", "--colour-weights", "",
                "--tone-weights", "0.3,0.6", "--tables", str(tables)])
    ious = torch.load(tables)["ious"]
    assert set(ious) == {"plain|intersection", "plain|mean", "plain|mean*tone:0.3", "plain|mean*tone:0.6"}
    assert not torch.equal(ious["plain|mean*tone:0.3"], ious["plain|mean"])
