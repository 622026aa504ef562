"""Choosing the map recipe on validation masks: costs, refinements, and the cost limit."""

from __future__ import annotations

import json

import pytest

from conftest import write_blob_dataset
from pixelvote.evaluate.selection import RECIPES, relative_cost, split_fusion


def test_relative_costs_count_views_and_refinements() -> None:
    assert relative_cost(RECIPES["plain"]) == 1.0
    assert relative_cost(RECIPES["flip"]) == 2.0
    assert relative_cost(RECIPES["tta"]) == 6.0  # 3 scales x (plain, flipped)
    assert relative_cost(RECIPES["plain"], "crf") == pytest.approx(1.4)
    assert relative_cost(RECIPES["layers-geo"]) == pytest.approx(1.5)
    assert relative_cost(RECIPES["guided"]) == pytest.approx(1.35)


def test_split_fusion() -> None:
    assert split_fusion("mean+crf") == ("mean", "crf")
    assert split_fusion("intersection") == ("intersection", "none")


@pytest.mark.parametrize("max_cost", [1.5, 2.0])
def test_training_chooses_within_the_cost_limit_and_saves_the_choice(tmp_path, max_cost: float) -> None:
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=8)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, map_candidates=["plain", "flip", "tta"],
                            max_map_cost=max_cost, min_masks_to_choose=1, val_fraction=0.4))
    sel = json.loads((run / "calibration.json").read_text())["selection"]
    cands = sel["candidates"]
    assert cands["tta+mean"]["relative_cost"] == 6.0 and cands["tta+mean"]["allowed"] is False
    assert cands["flip+mean"]["allowed"] is (max_cost >= 2.0)
    from pixelvote.refine import crf

    if crf.available():  # the CRF variants are tried, at 0.4 more passes
        assert cands["plain+mean+crf"]["relative_cost"] == pytest.approx(1.4)
        assert cands["plain+mean+crf"]["allowed"] is True
        assert cands["flip+mean+crf"]["allowed"] is False
    chosen = cands[f"{sel['recipe']}+{sel['fusion']}"]
    assert chosen["allowed"] and chosen["relative_cost"] <= max_cost
    best_allowed = max(max(c["mean_iou_by_threshold"].values()) for c in cands.values() if c["allowed"])
    assert sel["val_mean_iou"] == pytest.approx(best_allowed, abs=1e-4)
    cfg = read_run_config(run)
    fusion, refine = split_fusion(sel["fusion"])
    assert cfg.consensus.fusion == fusion and cfg.consensus.refine == refine
    assert cfg.maps == RECIPES[sel["recipe"]]
