"""The diagnosis rule: a threshold on P(any finding) chosen on the validation images, used everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_records, write_blob_dataset

from pixelvote.explain.analyze import analyze, diagnose
from pixelvote.models.ensemble import Ensemble
from pixelvote.train.calibrate import choose_decision_threshold


def test_diagnose_by_threshold_on_the_probability_of_any_finding() -> None:
    # classes: benign, malignant, normal (background 2)
    p = torch.tensor([[0.30, 0.25, 0.45],   # most probable: normal; any finding 0.55
                      [0.05, 0.10, 0.85],   # any finding 0.15
                      [0.70, 0.20, 0.10]])
    assert diagnose(p, 2).tolist() == [2, 2, 0]
    assert diagnose(p, 2, 0.5).tolist() == [0, 2, 0]  # a finding beats the background together
    assert diagnose(p, 2, 0.1).tolist() == [0, 1, 0]  # the most probable finding is named
    assert diagnose(p, 2, 0.9).tolist() == [2, 2, 2]


def test_choose_threshold_by_validation_accuracy() -> None:
    # two classes (finding 0, background 1): findings that the classifier gives 0.2-0.4 on this camera
    p_finding = torch.tensor([0.2, 0.3, 0.4, 0.9, 0.95, 0.01, 0.02, 0.05, 0.03, 0.6])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    probs = torch.stack([p_finding, 1 - p_finding], 1)
    t, summary = choose_decision_threshold(probs, labels, background=1)
    # 0.05, 0.1 and 0.15 get 9 of 10 right (0.02 calls two background images findings, 0.2 misses a finding);
    # of the tied ones the nearest 0.5 is kept
    assert t == 0.15
    assert summary["val_accuracy"] == pytest.approx(0.9)
    assert summary["val_accuracy_most_probable"] == pytest.approx(0.6)
    assert (diagnose(probs, 1, t) == labels).float().mean() == pytest.approx(0.9)


def test_choose_threshold_keeps_the_most_probable_class_on_a_tie_or_too_few_images() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]] * 3)
    labels = torch.tensor([0, 0, 1, 1] * 3)
    t, summary = choose_decision_threshold(probs, labels, background=1)
    assert t is None and summary["val_accuracy"] == 1.0  # already perfect: nothing to gain
    t, summary = choose_decision_threshold(probs[:4], labels[:4], background=1)
    assert t is None and "too few validation images" in summary["reason"]


def test_the_ensemble_and_each_member_diagnose_by_the_threshold(tiny_member) -> None:
    members = [tiny_member("tiny_cnn_a"), tiny_member("tiny_cnn_b")]
    imgs = (torch.rand(4, 3, 48, 48) * 255).to(torch.uint8)
    for t, expected in ((0.999999, 1), (1e-6, 0)):  # background is class 1 ("normal")
        ens = Ensemble(members, ["lesion", "normal"], "normal", 48, decision_threshold=t)
        a = analyze(ens, imgs, mc_samples=2, seeds=[0, 1, 2, 3])
        assert a.label.tolist() == [expected] * 4
        assert all(s["label"].tolist() == [expected] * 4 for s in a.stats)
        assert a.target.tolist() == [0] * 4  # a background diagnosis still explains the finding


def test_train_saves_the_chosen_rule_and_evaluate_reports_by_it(tmp_path) -> None:
    from pixelvote.evaluate.run import evaluate_run
    from pixelvote.models.checkpoint import load_run, read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=10)
    common = dict(data=data, preset="tiny", epochs=1, image_size=48, pretrained=False, mc_samples=2,
                  val_fraction=0.5, map_candidates=["plain"], refine_candidates=["none"],
                  colour_evidence=False)  # the threshold alone (the blobs' colour decides: test_evidence)
    run = train(TrainConfig(out=tmp_path / "run", **common))
    cal = json.loads((run / "calibration.json").read_text())
    chosen = cal["decision"]["threshold"]
    assert read_run_config(run).decision_threshold == chosen
    assert load_run(run)[0].decision_threshold == chosen
    assert cal["val_accuracy"] == pytest.approx(cal["decision"]["val_accuracy"])  # 5 images per class: chosen
    assert cal["decision"]["val_accuracy"] >= cal["decision"]["val_accuracy_most_probable"]
    plain = train(TrainConfig(out=tmp_path / "plain", decision="most-probable", **common))
    assert read_run_config(plain).decision_threshold is None
    assert json.loads((plain / "calibration.json").read_text())["decision"]["threshold"] is None

    # a rule that calls every image a finding: evaluate's accuracy (and every member's) follows it
    cfg = json.loads((run / "run.json").read_text())
    cfg["decision_threshold"] = 1e-6
    (run / "run.json").write_text(json.dumps(cfg))
    m = evaluate_run(run, data, tmp_path / "eval", num_workers=0, progress=False, max_gallery=1)
    cls = m["classification"]
    n_lesion = sum(r["truth"] == "lesion" for r in m["per_image"])
    assert cls["decision_threshold"] == 1e-6
    assert cls["ensemble"]["accuracy"] == pytest.approx(n_lesion / m["n_images"])
    assert all(r["label"] == "lesion" for r in m["per_image"])
    assert all(v["accuracy"] == pytest.approx(n_lesion / m["n_images"]) for v in cls["members"].values())
    assert "P(any finding) &gt; 1e-06" in (tmp_path / "eval" / "report.html").read_text()
    # annotate diagnoses by it too, and says so in annotate.json
    from pixelvote.engine.annotate import annotate

    annotate(run, data / "images" / "normal", tmp_path / "ann", mc_samples=2, num_workers=0, progress=False)
    records = read_records(tmp_path / "ann")
    assert records and all(r["label"] == "lesion" for r in records.values())
    assert json.loads((tmp_path / "ann" / "annotate.json").read_text())["decision_threshold"] == 1e-6


def test_calibration_does_not_depend_on_the_global_random_state(tmp_path) -> None:
    """Its MC samples are seeded per validation image (as annotate seeds them), so recalibrating a run gives
    the same decision threshold, flag thresholds and recipe whatever ran before it."""
    from pixelvote.train.calibrate import calibrate
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import prepare_data, train

    data = write_blob_dataset(tmp_path / "data", per_class=10)
    cfg = TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                      pretrained=False, mc_samples=4, val_fraction=0.5, map_candidates=["plain"],
                      refine_candidates=["none"], min_masks_to_choose=1)
    run = train(cfg)
    prepared = prepare_data(cfg, run)
    results = []
    for state in (1, 2):
        torch.manual_seed(state)
        consensus, maps, _, decision, evidence = calibrate(run, prepared.val, cfg, prepared.train)
        results.append((consensus.model_dump(), maps, decision, evidence,
                        json.loads((run / "calibration.json").read_text())["decision"]))
    assert results[0] == results[1]
    assert results[0][0]["mi_threshold"] is not None and results[0][0]["colour_prior"] is not None
