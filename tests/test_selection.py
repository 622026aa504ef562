"""Choosing the map recipe on validation masks: costs, refinements, and the cost limit."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import write_blob_dataset

from pixelvote.evaluate import selection
from pixelvote.evaluate.selection import (
    FORWARD_MS,
    RECIPES,
    REFERENCE,
    CostBasis,
    consensus_update,
    cost_basis,
    crf_cutoff,
    crf_fusions,
    crf_iterations,
    crf_ms,
    crf_size,
    crf_weight,
    relative_cost,
    split_fusion,
    variant_cost,
    without_iterations,
)
from pixelvote.explain.analyze import MapConfig
from pixelvote.models.registry import get_spec, list_models, preset_models
from pixelvote.refine.crf import CRFConfig


def test_relative_costs_count_views_and_refinements(monkeypatch) -> None:
    # a table of round figures: the CRF 2 ms + 4 ms per 128 x 128 pixels + 1 ms per such pixels and
    # iteration, the guided filter 10 ms, the colour prior 1 ms, against a 40-ms forward pass
    monkeypatch.setattr(selection, "CRF_MS", (2.0, 4.0, 1.0))
    monkeypatch.setattr(selection, "GUIDED_MS", 10.0)
    monkeypatch.setattr(selection, "COLOUR_MS", 1.0)
    basis = CostBasis(40.0, 224, "test")
    assert relative_cost(RECIPES["plain"], basis=basis) == 1.0
    assert relative_cost(RECIPES["flip"], basis=basis) == 2.0
    assert relative_cost(RECIPES["tta"], basis=basis) == 6.0  # 3 scales x (plain, flipped)
    assert relative_cost(RECIPES["layers-geo"], basis=basis) == pytest.approx(1.5)
    assert relative_cost(RECIPES["guided"], basis=basis) == pytest.approx(1.25)
    assert relative_cost(RECIPES["plain"], "crf", basis=basis) == pytest.approx(1 + 11 / 40)  # 5 iterations
    assert relative_cost(RECIPES["plain"], "crf", 10, basis=basis) == pytest.approx(1 + 16 / 40)
    assert relative_cost(RECIPES["guided"], "crf", 3, basis=basis) == pytest.approx(1.25 + 9 / 40)
    # at 256 px the CRF has 4 times the pixels: 2 + 4 * (4 + 5) ms
    large = CostBasis(40.0, 256, "test")
    assert relative_cost(RECIPES["plain"], "crf", 5, 256, large) == pytest.approx(1 + 38 / 40)
    # ... but never more than the map's: on 224-px maps it runs at 224, on 128-px maps at 128
    assert relative_cost(RECIPES["plain"], "crf", 5, 256, basis) == pytest.approx(1 + (2 + 3.0625 * 9) / 40)
    small = CostBasis(10.0, 128, "test")
    assert relative_cost(RECIPES["plain"], "crf", 5, 256, small) == pytest.approx(1 + 11 / 10)
    assert relative_cost(RECIPES["guided"], basis=small) == pytest.approx(1 + 10 * (128 / 224) ** 2 / 10)
    assert variant_cost(RECIPES["guided"], "mean+crf:30:10@agreeing", basis=basis) == pytest.approx(1.65)
    assert variant_cost(RECIPES["plain"], "mean+crf:30", basis=basis) == pytest.approx(1.275)  # base: 5
    twenty = CRFConfig(iterations=20)
    assert variant_cost(RECIPES["plain"], "mean+crf:30", twenty, basis) == pytest.approx(1.65)
    assert variant_cost(RECIPES["plain"], "mean*colour:0.75+crf:30:5:0.3:256", basis=large) == pytest.approx(
        1 + 38 / 40 + (256 / 224) ** 2 / 40)
    assert variant_cost(RECIPES["flip"], "vote", twenty, basis) == 2.0


def test_cost_basis_prices_the_crf_against_the_members_own_forward_pass() -> None:
    offline = cost_basis(preset_models("offline"), 224)
    assert offline.forward_ms == pytest.approx(REFERENCE.forward_ms) and "no timing" not in offline.source
    # the stride-16 members are slower, so the same CRF is a smaller share of their analysis
    os16 = cost_basis(preset_models("offline-os16"), 224)
    assert os16.forward_ms > offline.forward_ms
    crf_160 = "mean*colour:0.75+crf:30:15:0.3:160"
    assert variant_cost(RECIPES["plain"], crf_160, basis=os16) < variant_cost(RECIPES["plain"], crf_160)
    paper = cost_basis(preset_models("paper"), 224)
    assert variant_cost(RECIPES["plain"], crf_160, basis=paper) < variant_cost(RECIPES["plain"], crf_160,
                                                                                basis=os16)
    # in proportion to the input's pixels
    assert cost_basis(preset_models("offline"), 448).forward_ms == pytest.approx(4 * offline.forward_ms)
    # a backbone without a timing (registered elsewhere, or the test models) is priced as the offline
    # preset at the run's own input size, so that the CRF on its small maps is not set against a 224-px pass
    tiny = cost_basis(["tiny_cnn_a", "efficientnet_lite0"], 48)
    assert tiny.forward_ms == pytest.approx(REFERENCE.forward_ms * (48 / 224) ** 2)
    assert (tiny.image_size, tiny.members) == (48, 2) and "no timing for tiny_cnn_a" in tiny.source
    # the guided filter runs on each member's map: a single member pays a third of three members' filter
    one = cost_basis(["efficientnet_lite0"], 224)
    assert one.members == 1 and relative_cost(RECIPES["guided"], basis=one) == pytest.approx(
        1 + selection.GUIDED_MS / 3 / FORWARD_MS["efficientnet_lite0"])
    # every backbone pixelvote registers, but its test models, has a timing
    assert {n for n in list_models() if get_spec(n).source != "test"} <= set(FORWARD_MS)


def test_split_fusion() -> None:
    assert split_fusion("mean+crf") == ("mean", "crf")
    assert split_fusion("intersection") == ("intersection", "none")
    assert split_fusion("mean+crf:30@agreeing") == ("mean", "crf")
    assert split_fusion("mean+crf:30:10@agreeing") == ("mean", "crf")


def test_a_fusion_name_sets_the_crf_iterations() -> None:
    from pixelvote.consensus import ConsensusConfig

    assert crf_iterations("mean+crf:30:10@agreeing") == 10 and crf_weight("mean+crf:30:10") == 30.0
    assert crf_iterations("mean+crf:30") is None and crf_iterations("mean+crf") is None
    assert crf_iterations("vote") is None
    assert without_iterations("mean+crf:30:10@agreeing") == "mean+crf:30@agreeing"
    assert without_iterations("intersection+crf:2.5:3") == "intersection+crf:2.5"
    assert without_iterations("vote") == "vote" and without_iterations("mean@agreeing") == "mean@agreeing"
    assert crf_fusions([10, 30], [3, 10]) == ["intersection+crf:10:3", "intersection+crf:10:10",
                                              "intersection+crf:30:3", "intersection+crf:30:10",
                                              "mean+crf:10:3", "mean+crf:10:10", "mean+crf:30:3",
                                              "mean+crf:30:10"]
    assert crf_fusions([10]) == ["intersection+crf:10", "mean+crf:10"]
    base = ConsensusConfig(crf=CRFConfig(size=96, bilateral_compat=7.0, iterations=5))
    made = base.model_copy(update=consensus_update(base, "mean+crf:30:10"))
    assert made.crf == CRFConfig(size=96, bilateral_compat=30.0, iterations=10)
    assert base.crf.iterations == 5


def test_a_fusion_name_sets_the_crf_cutoff() -> None:
    from pixelvote.consensus import ConsensusConfig

    assert crf_cutoff("mean*colour:0.75+crf:30:10:0.3@agreeing") == 0.3
    assert crf_iterations("mean+crf:30:10:0.3") == 10 and crf_weight("mean+crf:30:10:0.3") == 30.0
    assert crf_cutoff("mean+crf:30:10") is None and crf_cutoff("vote") is None
    # one CRF pass serves every iteration count and cutoff of a weight
    assert without_iterations("mean+crf:30:10:0.3@agreeing") == "mean+crf:30@agreeing"
    assert crf_fusions([30], [5, 10], [0.3, 0.5]) == [
        "intersection+crf:30:5:0.3", "intersection+crf:30:5:0.5", "intersection+crf:30:10:0.3",
        "intersection+crf:30:10:0.5", "mean+crf:30:5:0.3", "mean+crf:30:5:0.5", "mean+crf:30:10:0.3",
        "mean+crf:30:10:0.5"]
    with pytest.raises(ValueError, match="iterations"):
        crf_fusions([30], [], [0.3])
    base = ConsensusConfig(crf=CRFConfig(size=96, iterations=5, cutoff=0.4))
    made = base.model_copy(update=consensus_update(base, "mean*colour:0.5+crf:30:10:0.3"))
    assert made.crf == CRFConfig(size=96, bilateral_compat=30.0, iterations=10, cutoff=0.3)
    # a name without a cutoff keeps the consensus's own
    assert base.model_copy(update=consensus_update(base, "mean+crf:30:10")).crf.cutoff == 0.4
    assert variant_cost(MapConfig(), "mean+crf:30:10:0.3") == variant_cost(MapConfig(), "mean+crf:30:10")


def test_a_fusion_name_sets_the_crf_size_and_its_cost_follows_the_pixels() -> None:
    from pixelvote.consensus import ConsensusConfig

    assert crf_size("mean*colour:0.75+crf:30:15:0.3:160@agreeing") == 160
    assert crf_size("mean+crf:30:15:0.3") is None and crf_size("vote") is None
    # one CRF pass per size serves its iteration counts and cutoffs; the size stays in the group's name
    assert without_iterations("mean+crf:30:15:0.3:160@agreeing") == "mean+crf:30:::160@agreeing"
    assert crf_size(without_iterations("mean+crf:30:15:0.3:160")) == 160
    assert crf_iterations(without_iterations("mean+crf:30:15:0.3:160")) is None
    assert crf_fusions([30], [15], [0.3], [128, 160]) == [
        "intersection+crf:30:15:0.3:128", "intersection+crf:30:15:0.3:160",
        "mean+crf:30:15:0.3:128", "mean+crf:30:15:0.3:160"]
    with pytest.raises(ValueError, match="sizes"):
        crf_fusions([30], [15], [], [160])
    # the consensus's own size alone is not named; another, or more than one, is
    assert crf_fusions([30], [15], [0.3], [128], own_size=128) == crf_fusions([30], [15], [0.3])
    assert crf_fusions([30], [15], [0.3], [160], own_size=128)[0] == "intersection+crf:30:15:0.3:160"
    # the CRF never runs larger than the maps: on 48-px maps, 128 and 160 px are one candidate at 48 (the
    # consensus's own size there too, so unnamed); on 144-px maps, 128 and 144
    small = crf_fusions([30], [15], [0.3], [128, 160], own_size=128, map_size=48)
    assert small == crf_fusions([30], [15], [0.3])
    assert crf_fusions([30], [15], [0.3], [128, 160], own_size=128, map_size=144) == [
        f"{f}+crf:30:15:0.3:{z}" for f in ("intersection", "mean") for z in (128, 144)]
    base = ConsensusConfig(crf=CRFConfig(size=128, iterations=5, cutoff=0.4))
    made = base.model_copy(update=consensus_update(base, "mean+crf:30:10:0.3:160"))
    assert made.crf == CRFConfig(size=160, bilateral_compat=30.0, iterations=10, cutoff=0.3)
    assert base.model_copy(update=consensus_update(base, "mean+crf:30:10:0.3")).crf.size == 128
    # the pixels' part of the CRF's time grows with (160 / 128)^2 = 1.5625, its fixed part does not
    fixed, per_pixel, per_iteration = selection.CRF_MS
    ms_160 = fixed + 1.5625 * (per_pixel + 10 * per_iteration)
    assert variant_cost(MapConfig(), "mean+crf:30:10:0.3:160") == pytest.approx(
        1 + ms_160 / REFERENCE.forward_ms)
    ms_64 = fixed + (per_pixel + 10 * per_iteration) / 4
    assert variant_cost(MapConfig(), "mean+crf:30:10:0.3", CRFConfig(size=64)) == pytest.approx(
        1 + ms_64 / REFERENCE.forward_ms)


def test_a_fusion_name_sets_the_crf_weight_and_keeps_the_other_crf_settings() -> None:
    from pixelvote.consensus import ConsensusConfig

    assert crf_weight("mean+crf:30@agreeing") == 30.0 and crf_weight("mean+crf:2.5") == 2.5
    assert crf_weight("mean+crf") is None and crf_weight("vote") is None
    base = ConsensusConfig(crf=CRFConfig(size=96, bilateral_compat=7.0))
    update = consensus_update(base, "intersection+crf:30@agreeing")
    assert update["crf"] == CRFConfig(size=96, bilateral_compat=30.0)
    assert {k: v for k, v in update.items() if k != "crf"} == {"fusion": "intersection", "refine": "crf",
                                                               "labelled_members": "agreeing",
                                                               "colour_weight": 0.0, "tone_weight": 0.0}
    assert consensus_update(base, "mean+crf")["crf"] == base.crf  # the base's own weight (7) applies
    made = base.model_copy(update=consensus_update(base, "mean+crf:20"))
    assert made.crf.bilateral_compat == 20.0 and made.crf.size == 96 and base.crf.bilateral_compat == 7.0


@pytest.mark.parametrize("max_cost", [1.5, 2.0])
def test_training_chooses_within_the_cost_limit_and_saves_the_choice(tmp_path, max_cost: float) -> None:
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=8)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, map_candidates=["plain", "flip", "tta"],
                            max_map_cost=max_cost, min_masks_to_choose=1, val_fraction=0.4,
                            crf_bases=20))  # the CRF's grid on every fusion: the cost limit alone prunes it
    sel = json.loads((run / "calibration.json").read_text())["selection"]
    cands = sel["candidates"]
    # TTA (6 passes) fits neither limit (annotation, and pseudo-labels at 2.5), so it is not tried
    assert sel["not_tried_over_cost"] == {"tta": 6.0}
    assert not any(k.startswith("tta+") for k in cands)
    assert cands["flip+mean"]["allowed"] is (max_cost >= 2.0)
    from pixelvote.refine import crf

    # the test models have no timing: priced as the offline preset at the run's 48 px
    forward_ms = REFERENCE.forward_ms * (48 / 224) ** 2
    assert sel["cost_basis"]["forward_ms"] == pytest.approx(forward_ms, abs=0.01)
    assert "no timing for tiny_cnn_a" in sel["cost_basis"]["source"]
    basis = cost_basis([m.name for m in read_run_config(run).members], 48)

    def cost_of(key: str) -> float:  # a labelled candidate's cost, as calibration prices it
        recipe, fusion = key.partition("@")[0].split("+", 1)
        return variant_cost(RECIPES[recipe], fusion, CRFConfig(), basis)

    labelled = sel["labelled_candidates"]
    if crf.available():  # the CRF variants are tried where they fit the choice's limit, at crf_ms (on the
        # 48-px maps) over the forward pass (the cutoff costs nothing), with each bilateral weight, iteration
        # count and cutoff of TrainConfig (default 10 and 30; 3, 5, 10 and 15; 0.3 and 0.5). Against so
        # short a pass the CRF's fixed cost weighs: about 1.85 at 3 iterations, 2.3 at 10, 2.6 at 15, so at
        # 1.5 no CRF is scored for annotation, at 2.0 the shorter ones are, and 15 iterations exceed even
        # `best`'s 2.5 (not tried at all)
        for w in ("10", "30"):
            costs = [(n, 1 + crf_ms(n, 128, 48) / forward_ms) for n in (3, 5, 10, 15)]
            assert [cost <= 2.0 for _, cost in costs] == [True, True, False, False]
            assert costs[-1][1] > 2.5
            for (n, cost), c in itertools.product(costs, ("0.3", "0.5")):
                key = f"plain+mean+crf:{w}:{n}:{c}"
                if cost > max_cost:
                    assert key not in cands  # over this limit it could never be chosen: not scored
                else:
                    assert cands[key]["relative_cost"] == pytest.approx(cost, abs=1e-3)
                    assert cands[key]["allowed"] is True
                    # one CRF pass per threshold: tried up to 0.6 only
                    assert max(map(float, cands[key]["mean_iou_by_threshold"])) == 0.6
                # `best` scores pseudo-masks within 2.5; flip + CRF costs 1 more, over it: not tried
                assert (key in labelled) is (cost <= 2.5)
                assert f"flip+mean+crf:{w}:{n}:{c}" not in labelled
        assert max(map(float, cands["plain+mean"]["mean_iou_by_threshold"])) == 0.95
        assert not any(k.endswith("+crf") or k.endswith(f"+crf:{w}") for k in cands for w in ("10", "30"))
    # `best` (pseudo-masks of labelled images) is scored as `annotate --labels` makes them, within 2.5
    # (each mean fusion also with only the agreeing members fused, "@agreeing")
    plain_keys = {k for k in cands if "+crf" not in k}
    assert plain_keys | {f"{k}@agreeing" for k in plain_keys if "+mean" in k} <= set(labelled)
    assert all(cost_of(k) <= 2.5 for k in labelled)
    assert sel["best"]["val_mean_iou"] == pytest.approx(max(labelled.values()), abs=1e-4)
    assert sel["best"]["relative_cost"] <= 2.5 and sel["best"]["scored_with"].startswith("the images' labels")
    within = {k: v for k, v in labelled.items() if cost_of(k) <= max_cost}
    assert sel["labelled"]["val_mean_iou"] == pytest.approx(max(within.values()), abs=1e-4)
    chosen = cands[f"{sel['recipe']}+{sel['fusion']}"]
    assert chosen["allowed"] and chosen["relative_cost"] <= max_cost
    best_allowed = max(max(c["mean_iou_by_threshold"].values()) for c in cands.values() if c["allowed"])
    assert sel["val_mean_iou"] == pytest.approx(best_allowed, abs=1e-4)
    cfg = read_run_config(run)
    fusion, refine = split_fusion(sel["fusion"])
    assert cfg.consensus.fusion == fusion and cfg.consensus.refine == refine
    assert cfg.maps == RECIPES[sel["recipe"]]
    assert cfg.best is not None and cfg.best.maps == RECIPES[sel["best"]["recipe"]]
    assert cfg.best.consensus.threshold == sel["best"]["threshold"]
    assert cfg.best.consensus.mi_threshold == cfg.consensus.mi_threshold  # the same flags
    assert cfg.labelled is not None and cfg.labelled.maps == RECIPES[sel["labelled"]["recipe"]]
    assert cfg.labelled.consensus.threshold == sel["labelled"]["threshold"]
    members = "agreeing" if sel["labelled"]["fusion"].endswith("@agreeing") else "all"
    assert cfg.labelled.consensus.labelled_members == members
    # a CRF fusion's weight, iterations and cutoff are the ones saved; without the CRF the defaults stay
    for consensus, chosen in ((cfg.consensus, sel), (cfg.labelled.consensus, sel["labelled"]),
                              (cfg.best.consensus, sel["best"])):
        default = CRFConfig()
        assert consensus.crf.bilateral_compat == (crf_weight(chosen["fusion"]) or default.bilateral_compat)
        assert consensus.crf.iterations == (crf_iterations(chosen["fusion"]) or default.iterations)
        assert consensus.crf.cutoff == (crf_cutoff(chosen["fusion"]) or default.cutoff)


def test_segmenter_rows_are_gated_by_the_diagnosis(tmp_path) -> None:
    """The ablation's segmenter rows: a segmenter that marks every pixel scores each lesion image's truth area
    over its image area where the ensemble diagnoses a lesion, and 0 where it says background; the CRF row
    (with the crf extra) keeps a map that is certain everywhere as it is."""
    import numpy as np
    import torch
    from PIL import Image

    from pixelvote.data.transforms import resize_image, to_tensor
    from pixelvote.evaluate.selection import Batch, collect
    from pixelvote.explain.analyze import MapConfig, analyze
    from pixelvote.models.checkpoint import load_run
    from pixelvote.refine import crf
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=6)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, val_fraction=0.4))
    ens, _ = load_run(run)
    paths = sorted((data / "images" / "lesion").glob("*.png"))
    imgs = torch.stack([resize_image(to_tensor(np.asarray(Image.open(p).convert("RGB"))), 48) for p in paths])
    masks = [torch.from_numpy(np.asarray(Image.open(data / "masks" / "lesion" / p.name)) > 0) for p in paths]
    lesion = ens.classes.index("lesion")
    batch = Batch(imgs, torch.full((len(paths),), lesion), masks, list(range(len(paths))))

    class Everything(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(20.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0], *x.shape[-2:])

    tables = collect(ens, [batch], {"plain": MapConfig()}, fusions=("mean",), segmenter=Everything())
    diagnosed = analyze(ens, imgs, mc_samples=1, seeds=list(range(len(paths)))).label != ens.background_index
    expected = torch.tensor([float(m.float().mean()) if bool(d) else 0.0
                             for m, d in zip(masks, diagnosed, strict=True)])
    keys = [("segmenter", "-")] + ([("segmenter", "crf")] if crf.available() else [])
    for key in keys:
        ious = tables[key].ious
        assert ious.shape[0] == len(paths)
        assert torch.allclose(ious[:, ious.shape[1] // 2], expected, atol=1e-6)


def test_method_best_uses_the_runs_best_recipe_and_falls_back_without_one(caplog) -> None:
    from pixelvote.consensus import ConsensusConfig
    from pixelvote.engine.annotate import method_recipe, resolve_recipe
    from pixelvote.errors import ConfigError
    from pixelvote.explain.analyze import MapConfig
    from pixelvote.models.checkpoint import MemberConfig, Recipe, RunConfig

    cfg = RunConfig(classes=["lesion", "normal"], background="normal",
                    members=[MemberConfig(name="tiny_cnn_a")],
                    consensus=ConsensusConfig(fusion="mean", threshold=0.4), maps=MapConfig(contrast=True))
    assert method_recipe(cfg, "best") == (cfg.consensus, cfg.maps)  # an older run: its own recipe
    assert "no 'best' recipe" in caplog.text
    best = Recipe(consensus=ConsensusConfig(fusion="intersection", threshold=0.3),
                  maps=MapConfig(tta_flip=True, contrast=True))
    cfg = cfg.model_copy(update={"best": best})
    c, m, T = resolve_recipe(cfg, "best", {"threshold": 0.35}, None, None)
    assert (c.fusion, c.threshold, m.tta_flip, T) == ("intersection", 0.35, True, 30)
    assert method_recipe(cfg, "run") == (cfg.consensus, cfg.maps)
    paper_c, paper_m = method_recipe(cfg, "paper")
    assert (paper_c.fusion, paper_c.threshold, paper_m) == ("intersection", 0.5, MapConfig())
    with pytest.raises(ConfigError, match="Did you mean 'best'"):
        method_recipe(cfg, "bset")
    # annotate --labels: the run's recipe for labelled images, where it has one
    assert method_recipe(cfg, "run", labels=True) == (cfg.consensus, cfg.maps)
    labelled = Recipe(consensus=ConsensusConfig(fusion="mean", threshold=0.2, refine="none"),
                      maps=MapConfig())
    cfg = cfg.model_copy(update={"labelled": labelled})
    assert method_recipe(cfg, "run", labels=True) == (labelled.consensus, labelled.maps)
    assert method_recipe(cfg, "run") == (cfg.consensus, cfg.maps)
    assert method_recipe(cfg, "best", labels=True) == (best.consensus, best.maps)


def test_fusion_names_carry_refinement_and_members() -> None:
    from pixelvote.evaluate.selection import fusion_settings

    assert split_fusion("mean+crf@agreeing") == ("mean", "crf") == split_fusion("mean+crf")
    assert fusion_settings("mean+crf@agreeing") == {"fusion": "mean", "refine": "crf",
                                                    "labelled_members": "agreeing"}
    assert fusion_settings("vote") == {"fusion": "vote", "refine": "none", "labelled_members": "all"}


@pytest.mark.parametrize("k", [2, 3])
def test_both_ways_of_scoring_share_one_analysis_where_the_explained_classes_agree(tiny_member, monkeypatch,
                                                                                    k: int) -> None:
    """collect_modes gives the tables that two collect passes (diagnosis-gated, labels deciding) give, with
    one analysis per recipe and batch where the labels do not change the explained class (two classes), and
    a second one where they do (a background diagnosis of an image labelled with the less probable
    finding)."""
    import torch

    from pixelvote.evaluate import selection
    from pixelvote.evaluate.selection import Batch, collect, collect_modes
    from pixelvote.explain.analyze import MapConfig, analyze
    from pixelvote.models.ensemble import Ensemble

    classes = ["a", "b", "c"][:k]
    members = [tiny_member("tiny_cnn_a", k=k), tiny_member("tiny_cnn_b", k=k)]
    imgs = (torch.rand(6, 3, 48, 48) * 255).to(torch.uint8)
    # the background is the class diagnosed most often, so that some images are diagnosed as background
    first = analyze(Ensemble(members, classes, classes[0], 48), imgs, mc_samples=1, seeds=list(range(6)))
    bg = int(torch.bincount(first.label, minlength=k).argmax())
    ens = Ensemble(members, classes, classes[bg], 48)
    a = analyze(ens, imgs, mc_samples=1, seeds=list(range(6)))
    probs = a.ensemble_probs.clone()
    probs[:, bg] = 2.0  # the least probable finding of each image
    labels = torch.where(a.label == bg, probs.argmin(-1), a.label)
    labels = torch.where(labels == bg, probs.argmin(-1), labels)
    missed = a.label == bg
    assert bool(missed.any()) and not bool((labels == bg).any())
    masks = [torch.rand(30, 40) > 0.6 for _ in range(6)]
    batch = Batch(imgs, labels, masks, list(range(6)))
    recipes = {"plain": MapConfig(), "contrast": MapConfig(contrast=True)}

    calls = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("given") is not None)
        return analyze(*args, **kwargs)

    monkeypatch.setattr(selection, "analyze", counted)
    both = collect_modes(ens, [batch], recipes, {False: ("mean", "vote"), True: ("mean", "mean@agreeing")})
    differs = k == 3  # with two classes the least probable finding is the most probable one
    assert calls == ([True, False, True, False] if differs else [True, True])
    for mode, fusions in ((False, ("mean", "vote")), (True, ("mean", "mean@agreeing"))):
        alone = collect(ens, [batch], recipes, fusions=fusions, given_labels=mode)
        assert set(alone) == set(both[mode])
        for key, table in alone.items():
            assert torch.allclose(table.ious, both[mode][key].ious)
    # the labels change the masks of the missed images, so sharing must not have mixed the two up
    gated, labelled = both[False][("plain", "mean")].ious, both[True][("plain", "mean")].ious
    assert not torch.allclose(gated[missed], labelled[missed])


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_an_images_margins_resized_together_score_as_each_alone(resize: str) -> None:
    import torch

    from pixelvote.evaluate.selection import _margin_ious, at_size, iou_over_grid

    g = torch.Generator().manual_seed(0)
    margins = [torch.randn(2, 16, 16, generator=g) - 0.3 for _ in range(4)]
    margins[1] = None  # a threshold not refined
    truth = torch.zeros(23, 37, dtype=torch.bool)
    truth[5:15, 10:30] = True
    for j in range(2):
        alone = [float("nan") if m is None else
                 float(iou_over_grid(at_size(m[j], truth, resize), truth, (0.0,))[0]) for m in margins]
        together = _margin_ious(margins, j, truth, resize).tolist()
        assert str(together) == str(alone)  # bit-identical, NaN where not refined
        assert 0 < min(v for v in alone if v == v) < 1
    assert _margin_ious([None, None], 0, truth).isnan().all()


def test_a_map_already_at_the_truths_size_is_scored_as_it_is() -> None:
    import torch
    import torch.nn.functional as F

    from pixelvote.evaluate.selection import at_size

    g = torch.Generator().manual_seed(0)
    for shape in ((3, 24, 24), (24, 24), (2, 30, 20)):
        score = torch.randn(*shape, generator=g)
        truth = torch.zeros(shape[-2:], dtype=torch.bool)
        resized = F.interpolate(score.view(1, -1, *shape[-2:]), size=shape[-2:], mode="bilinear",
                                align_corners=False).view(shape)
        assert torch.equal(at_size(score, truth), score) and torch.equal(resized, score)


def test_refined_rows_share_the_fused_map_and_the_crf_result_across_cutoffs(monkeypatch) -> None:
    import torch
    from test_consensus import LESION, _analysis
    from test_crf import _scene

    import pixelvote.evaluate.selection as selection
    from pixelvote.consensus import ConsensusConfig, apply_consensus
    from pixelvote.refine import crf

    pytest.importorskip("pydensecrf.densecrf")
    img, blob, truth = _scene()
    maps = torch.stack([torch.stack([blob.roll(3 * m + i, 1) for i in range(2)]) for m in range(2)])
    a = _analysis(maps, [[LESION, LESION]] * 2)
    a.inputs = torch.stack([img, img.roll(5, -1)]).float() / 255.0
    base = ConsensusConfig(fusion="mean", refine="crf")
    fusions = ["mean+crf:30:4:0.3", "mean+crf:30:4:0.5", "mean+crf:30:2:0.3", "mean+crf:30:2:0.5",
               "intersection+crf:30:4:0.3", "intersection+crf:30:4:0.5"]
    configs = [base.model_copy(update=selection.consensus_update(base, f)) for f in fusions]
    batch = selection.Batch(a.inputs, torch.zeros(2, dtype=torch.long), [truth, truth.roll(5, -1)], [0, 1])
    grid = (0.3, 0.5, 0.7)  # 0.7: above REFINED_MAX_THRESHOLD, not refined
    made, unaries, passes = [], [], []
    for module, name, log in ((selection, "soft_margins", made), (crf, "crf_unary", unaries),
                              (crf, "dense_crf", passes)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *x, real=real, log=log, **k: log.append(1) or real(*x, **k))
    with crf.reuse(steps={2, 4}):
        rows, _ = selection._refined_rows(a, configs, 1, batch, [0, 1], grid)
    # one fused map per fusion; at each refined threshold one unary per fused map and one CRF call per
    # iteration count: the cutoffs read the same result
    assert len(made) == 2 and len(unaries) == 2 * 2 and len(passes) == 2 * (2 + 1)
    monkeypatch.undo()
    for cfg, fusion_rows in zip(configs, rows, strict=True):
        for j, row in enumerate(fusion_rows):
            for t, iou in zip(grid, row.tolist(), strict=True):
                if t > selection.REFINED_MAX_THRESHOLD:
                    assert iou != iou  # NaN: not tried
                    continue
                mask = apply_consensus(a, cfg.model_copy(update={"threshold": t}), 1).mask[j]
                expected = float((mask & batch.masks[j]).sum() / (mask | batch.masks[j]).sum())
                assert iou == pytest.approx(expected, abs=1e-6)


def test_calibration_scores_validation_masks_at_their_images_size(tmp_path) -> None:
    """Users get masks at their images' size and `evaluate` scores them there: calibration's truth is each
    validation mask at its image's size (48 x 64 here), not squashed onto the 48-px model input."""
    from pixelvote.data.dataset import load_dataset
    from pixelvote.train.cache import cache_samples
    from pixelvote.train.calibrate import _val_batches

    data = write_blob_dataset(tmp_path / "data", per_class=3)
    ds = load_dataset(data)
    val = cache_samples(ds.samples, ds.classes, 48, full_masks=True)
    assert val.full_masks is not None and len(val.full_masks) == len(val) == 6
    truths = [m for b in _val_batches(val, 4) for m in b.masks]
    lesion = [i for i, s in enumerate(val.samples) if s.label == "lesion"]
    assert [m is not None for m in truths] == [i in lesion for i in range(6)]
    for i in lesion:
        assert truths[i].shape == (48, 64) and truths[i].dtype == torch.bool
        assert int(truths[i].sum()) == 144  # the 12 x 12 square, unresized
        assert val.masks[i].shape == (48, 48)
    # large images' truths are kept at most FULL_MASK_SIDE long, aspect kept (memory)
    import pixelvote.train.cache as cache

    cache.FULL_MASK_SIDE, side = 32, cache.FULL_MASK_SIDE
    try:
        capped = cache_samples(ds.samples, ds.classes, 48, full_masks=True)
    finally:
        cache.FULL_MASK_SIDE = side
    for i in lesion:
        assert capped.full_masks[i].shape == (24, 32)
        assert 25 <= int(capped.full_masks[i].sum()) <= 36  # the 12-px square halved: 5-6 px a side
    # without the full-size masks (a set cached before them) the input-size masks serve
    small = cache_samples(ds.samples, ds.classes, 48)
    assert small.full_masks is None
    assert [m.shape for b in _val_batches(small, 4) for m in b.masks if m is not None] == [(48, 48)] * 3


def test_training_chooses_the_crf_size_and_saves_it(tmp_path) -> None:
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.refine import crf
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    if not crf.available():
        pytest.skip("the CRF needs pydensecrf2 (pip install 'pixelvote[crf]')")
    data = write_blob_dataset(tmp_path / "data", per_class=8)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, map_candidates=["plain"], min_masks_to_choose=1,
                            val_fraction=0.4, crf_weights=[10], crf_iterations=[3], crf_cutoffs=[0.5],
                            crf_sizes=[24, 48, 64], colour_weights=[], max_map_cost=3.0))
    sel = json.loads((run / "calibration.json").read_text())["selection"]
    cands = sel["candidates"]
    assert not any(k.endswith(":64") for k in cands)  # 64 px on 48-px maps is the 48-px candidate
    for f, size in itertools.product(("mean", "intersection"), (24, 48)):  # both sizes, each at its cost
        cost = cands[f"plain+{f}+crf:10:3:0.5:{size}"]["relative_cost"]
        assert cost == pytest.approx(1 + crf_ms(3, size, 48) / (REFERENCE.forward_ms * (48 / 224) ** 2),
                                     abs=1e-3)  # rounded to 3
    assert read_run_config(run).consensus.crf.size == (crf_size(sel["fusion"]) or CRFConfig().size)
    with pytest.raises(Exception, match="crf-sizes"):
        TrainConfig(data=data, out=tmp_path / "x", crf_sizes=[8])


def test_the_crf_grid_is_scored_only_on_the_recipes_and_fusions_that_do_best_without_it(tmp_path) -> None:
    from pixelvote.refine import crf
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    if not crf.available():
        pytest.skip("the CRF needs pydensecrf2 (pip install 'pixelvote[crf]')")
    data = write_blob_dataset(tmp_path / "data", per_class=8)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, map_candidates=["plain", "contrast", "guided"],
                            min_masks_to_choose=1, val_fraction=0.4, crf_weights=[10], crf_iterations=[3],
                            crf_cutoffs=[0.5], crf_sizes=[48], colour_weights=[], max_map_cost=3.0,
                            max_pseudo_label_cost=3.0, crf_recipes=1, crf_bases=1))
    sel = json.loads((run / "calibration.json").read_text())["selection"]
    cands, labelled = sel["candidates"], sel["labelled_candidates"]

    def score(v) -> float:
        return v if isinstance(v, float) else max(v["mean_iou_by_threshold"].values(), default=-1.0)

    def without_crf(table: dict, recipe: str) -> float:
        return max((v if isinstance(v, float) else max(v["mean_iou_by_threshold"].values()))
                   for k, v in table.items() if k.startswith(f"{recipe}+") and "+crf" not in k)

    recipes = ("plain", "contrast", "guided")
    for table, mode in ((cands, "gated"), (labelled, "labelled")):
        (tried,) = sel["crf_tried_on"][mode]  # one recipe, the best without the CRF (IoUs rounded to 4)
        assert without_crf(table, tried) >= max(without_crf(table, r) for r in recipes) - 1e-4
        with_crf = {k.split("+", 1)[0] for k in table if "+crf" in k}
        assert with_crf == {tried}
        # and there on one fusion, the best without it of those it refines (the tone prior's is one)
        refinable = ("intersection", "mean", "mean*tone:0.5")
        (kept,) = sel["crf_tried_with"][mode][tried]
        assert score(table[f"{tried}+{kept}"]) >= max(score(table[f"{tried}+{b}"]) for b in refinable) - 1e-4
        refined = [k for k in table if k.startswith(f"{tried}+") and "+crf" in k]
        assert {k.split("+")[1].partition("@")[0] for k in refined} == {kept}
        assert f"{tried}+{kept}+crf:10:3:0.5" in table
    # every recipe is still scored without the CRF, in both ways
    assert all(f"{r}+mean" in cands and f"{r}+mean@agreeing" in labelled for r in recipes)
    with pytest.raises(Exception, match="crf_recipes"):
        TrainConfig(data=data, out=tmp_path / "x", crf_recipes=0)
    with pytest.raises(Exception, match="crf_bases"):
        TrainConfig(data=data, out=tmp_path / "x", crf_bases=0)
