"""Colour evidence in the diagnosis: the evidence, the rule, how train chooses it and how every diagnosis
follows it."""

from __future__ import annotations

import json

import pytest
import torch

from pixelvote.explain.analyze import analyze
from pixelvote.explain.evidence import EvidenceRule, colour_evidence
from pixelvote.refine.colour import ColourPrior, colour_bins
from pixelvote.train.calibrate import choose_decision_rule

RED, GREY = (220, 30, 30), (100, 100, 100)


def _prior(red: float = 0.9, rest: float = 0.1) -> ColourPrior:
    p = [rest] * 512
    p[int(colour_bins(torch.tensor(RED, dtype=torch.uint8).view(1, 3, 1, 1)))] = red
    return ColourPrior(probability=p, images=2, findings=1)


def _grey(size: int = 32) -> torch.Tensor:
    return torch.tensor(GREY, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).clone()


def test_the_evidence_is_the_strongest_patch_of_the_map_with_the_findings_colour() -> None:
    prior = _prior()
    patch, pixel, far = _grey(224), _grey(224), _grey(224)
    red = torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)
    patch[:, 100:107, 100:107] = red  # 7 x 7: the window at 224 px
    pixel[:, 103, 103] = red[:, 0, 0]
    far[:, 0:7, 210:217] = red
    imgs = torch.stack([patch, pixel, far])
    maps = torch.zeros(3, 224, 224)
    maps[:, 80:130, 80:130] = 1.0  # the models look at the centre
    ev = colour_evidence(maps, imgs, prior, 0.75)
    # the red patch under the map: the whole patch is map 1 and prior 0.9
    assert float(ev[0]) == pytest.approx(0.9 ** 0.75, abs=1e-5)
    # one red pixel is not a finding: the window's mean is mostly grey
    assert float(ev[1]) == pytest.approx((0.9 ** 0.75 + 48 * 0.1 ** 0.75) / 49, abs=1e-5)
    # red where the models do not look counts nothing; grey under the map its prior
    # the window slides: a red square half under the map gives the window that holds its covered half
    edge = _grey(224)
    edge[:, 100:107, 127:134] = red  # the map ends at column 130: 3 of 7 columns under it
    # best window: columns 124..130 hold the 3 covered red columns (the rest: grey under the map)
    assert float(colour_evidence(maps[:1], edge[None], prior, 0.75)) == pytest.approx(
        (21 * 0.9 ** 0.75 + 28 * 0.1 ** 0.75) / 49, abs=1e-5)
    assert float(ev[2]) == pytest.approx(0.1 ** 0.75, abs=1e-5)
    # members' maps (M, B, S, S) give one value each
    assert colour_evidence(maps.expand(2, -1, -1, -1), imgs, prior, 0.75).shape == (2, 3)
    # at 32 px the patch is one pixel: the single red pixel is all the evidence there
    small = torch.nn.functional.interpolate(maps[1:2, None], size=(32, 32))[:, 0]
    one = _grey(32)
    one[:, 14, 14] = red[:, 0, 0]
    assert float(colour_evidence(small, one[None], prior, 0.75)) == pytest.approx(0.9 ** 0.75, abs=1e-5)


def test_the_rule_is_a_logistic_boundary_on_the_logit_and_the_evidence() -> None:
    rule = EvidenceRule(colour_weight=0.75, logit_coef=1.0, evidence_coef=10.0, intercept=-5.0)
    p = torch.tensor([0.5, 0.5, 0.99, 0.01])
    e = torch.tensor([0.6, 0.4, 0.0, 0.9])
    # logit 0 + 6 - 5 > 0; 0 + 4 - 5 < 0; 4.6 + 0 - 5 < 0; -4.6 + 9 - 5 < 0
    assert rule.finding(p, e).tolist() == [True, False, False, False]
    with pytest.raises(ValueError):
        EvidenceRule(colour_weight=0.0, logit_coef=1, evidence_coef=1, intercept=0)


def _probs(p_finding: torch.Tensor) -> torch.Tensor:
    return torch.stack([p_finding, 1 - p_finding], 1)  # classes (finding, background)


def test_train_keeps_the_evidence_only_where_it_beats_the_threshold_held_out() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 20 + [1] * 20)  # 20 findings, 20 background
    # the probability hardly tells them apart; the evidence does
    p = torch.rand(40, generator=g) * 0.2 + 0.4
    ev = torch.where(labels == 0, 0.7, 0.2) + torch.rand(40, generator=g) * 0.05
    rule, summary = choose_decision_rule(_probs(p), {0.75: ev}, labels, background=1)
    assert rule is not None and summary["kept"] and rule.colour_weight == 0.75
    held = summary["held_out_accuracy"]
    assert held["evidence:0.75"] == 1.0 and held["threshold"] < 0.8
    assert summary["val_accuracy"] == 1.0
    assert rule.finding(p, ev).tolist() == (labels == 0).tolist()
    # the best of several weights is kept
    rule, summary = choose_decision_rule(_probs(p), {0.5: torch.rand(40, generator=g), 0.9: ev}, labels, 1)
    assert rule is not None and rule.colour_weight == 0.9

    # where the probability already decides and the evidence is noise, the threshold stays
    p = torch.where(labels == 0, 0.8, 0.2)
    rule, summary = choose_decision_rule(_probs(p), {0.75: torch.rand(40, generator=g)}, labels, 1)
    assert rule is None and not summary["kept"] and summary["held_out_accuracy"]["threshold"] == 1.0
    # too few images of a class to choose
    rule, summary = choose_decision_rule(_probs(p[16:]), {0.75: ev[16:]}, labels[16:], 1)
    assert rule is None and "too few validation images" in summary["reason"]


def test_analyze_diagnoses_by_the_rule_members_too(tiny_ensemble) -> None:
    ens = tiny_ensemble
    imgs = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    plain = analyze(ens, imgs, mc_samples=3, seeds=[0, 1, 2, 3])
    assert plain.evidence is None
    prior = ColourPrior(probability=[0.5] * 512)
    # evidence_coef 100 and intercept 1: every image is a finding (evidence >= 0); -100 and -1: none is
    for coef, want in ((100.0, 0), (-100.0, 1)):
        ens.evidence_rule = EvidenceRule(colour_weight=0.5, logit_coef=0.0, evidence_coef=coef,
                                         intercept=coef / 100)
        ens.colour_prior = prior
        a = analyze(ens, imgs, mc_samples=3, seeds=[0, 1, 2, 3])
        assert a.label.tolist() == [want] * 4
        assert all(s["label"].tolist() == [want] * 4 for s in a.stats)
        assert a.evidence is not None and a.evidence.shape == (4,)
        assert torch.allclose(a.evidence, colour_evidence(a.maps.mean(0), imgs, prior, 0.5))
        # the probabilities and maps are those of the plain analysis: only the diagnosis changes
        assert torch.equal(a.ensemble_probs, plain.ensemble_probs) and torch.equal(a.maps, plain.maps)
    # a recipe of contrast maps (or any other) diagnoses alike: the evidence is the plain maps'
    from pixelvote.explain.analyze import MapConfig

    ens.evidence_rule = EvidenceRule(colour_weight=0.5, logit_coef=0.0, evidence_coef=1.0, intercept=-0.5)
    a = analyze(ens, imgs, mc_samples=3, seeds=[0, 1, 2, 3])
    recipes = (MapConfig(contrast=True), MapConfig(tta_flip=True, contrast=True), MapConfig(tta_flip=True))
    for recipe in recipes:
        c = analyze(ens, imgs, mc_samples=3, seeds=[0, 1, 2, 3], maps=recipe)
        assert torch.allclose(c.evidence, a.evidence) and torch.equal(c.label, a.label)
        assert all(torch.equal(s["label"], t["label"]) for s, t in zip(c.stats, a.stats, strict=True))
    assert not torch.equal(c.maps, a.maps)  # the maps are the recipe's


def test_a_rule_without_the_prior_names_run_json(tmp_path) -> None:
    from pixelvote.errors import CheckpointError
    from pixelvote.models.checkpoint import read_run_config

    (tmp_path / "run.json").write_text(json.dumps({
        "format_version": 1, "classes": ["lesion", "normal"], "background": "normal",
        "members": [{"name": "tiny_cnn_a"}],
        "decision_evidence": {"colour_weight": 0.75, "logit_coef": 1, "evidence_coef": 1, "intercept": 0}}))
    with pytest.raises(CheckpointError, match="consensus.colour_prior is missing") as info:
        read_run_config(tmp_path)
    assert "run.json" in str(info.value) and "re-run `pixelvote train`" in str(info.value)


def test_train_fits_the_rule_and_evaluate_and_annotate_follow_it(tmp_path) -> None:
    from conftest import read_records, write_blob_dataset

    from pixelvote.engine.annotate import annotate
    from pixelvote.evaluate.run import evaluate_run
    from pixelvote.models.checkpoint import load_run, read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    # bright squares on dark noise: brightness is the lesions' colour, and a one-epoch model is unsure
    data = write_blob_dataset(tmp_path / "data", per_class=10)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, val_fraction=0.5, map_candidates=["plain"],
                            refine_candidates=["none"]))
    cal = json.loads((run / "calibration.json").read_text())
    ev = cal["decision"]["evidence"]
    assert ev["kept"], ev
    assert ev["held_out_accuracy"]["evidence:0.75"] > ev["held_out_accuracy"]["threshold"]
    assert cal["val_accuracy"] == pytest.approx(ev["val_accuracy"])
    rc = read_run_config(run)
    assert rc.decision_evidence is not None and rc.decision_evidence.model_dump() == ev["rule"]
    ens, _ = load_run(run)
    assert ens.evidence_rule == rc.decision_evidence and ens.colour_prior == rc.consensus.colour_prior

    m = evaluate_run(run, data, tmp_path / "eval", num_workers=0, progress=False, max_gallery=1)
    cls = m["classification"]
    assert cls["decision_evidence"] == ev["rule"]
    correct = sum(r["label"] == r["truth"] for r in m["per_image"])
    assert cls["ensemble"]["accuracy"] == pytest.approx(correct / m["n_images"])
    assert "× colour evidence" in (tmp_path / "eval" / "report.html").read_text()

    annotate(run, data / "images" / "lesion", tmp_path / "ann", mc_samples=2, num_workers=0, progress=False)
    assert json.loads((tmp_path / "ann" / "annotate.json").read_text())["decision_evidence"] == ev["rule"]
    assert len(read_records(tmp_path / "ann")) == 10

    # --no-colour-evidence: the threshold alone
    plain = train(TrainConfig(data=data, out=tmp_path / "plain", preset="tiny", epochs=1, image_size=48,
                              pretrained=False, mc_samples=2, val_fraction=0.5, map_candidates=["plain"],
                              refine_candidates=["none"], colour_evidence=False))
    assert read_run_config(plain).decision_evidence is None
    assert "evidence" not in json.loads((plain / "calibration.json").read_text())["decision"]
