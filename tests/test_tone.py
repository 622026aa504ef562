"""The tone prior: findings darker or brighter than their surroundings, learned from labels, and its use."""

from __future__ import annotations

import json

import pytest
import torch
from test_consensus import LESION, _analysis

from pixelvote.consensus import ConsensusConfig, apply_consensus, soft_margins
from pixelvote.errors import ConfigError
from pixelvote.evaluate.selection import (
    REFERENCE,
    TONE_MS,
    colour_weight,
    consensus_update,
    tone_fusions,
    tone_weight,
    variant_cost,
)
from pixelvote.explain.analyze import MapConfig
from pixelvote.refine.tone import learn_tone, local_contrast, tone_evidence, tone_map, with_tone

SIZE = 64


def _disc(value: int, background: int = 128, size: int = SIZE, radius: int = 8) -> torch.Tensor:
    """A grey image ``(3, size, size)`` uint8 with a disc of ``value`` in its centre."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius ** 2
    img = torch.full((size, size), background, dtype=torch.uint8)
    img[inside] = value
    return img.expand(3, -1, -1).clone()


def _inside(size: int = SIZE, radius: int = 8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius ** 2


def test_local_contrast_is_positive_on_a_dark_disc_and_negative_on_a_bright_one() -> None:
    c = local_contrast(torch.stack([_disc(30), _disc(230)]))
    inside, far = _inside(), ~_inside(radius=20)
    assert c.shape == (2, SIZE, SIZE) and c.min() >= -1 and c.max() <= 1
    assert c[0][inside].mean() > 0.4 and c[1][inside].mean() < -0.3
    # away from the disc the surroundings are the pixel's own grey
    assert c[0][far].abs().max() < 0.05 and c[1][far].abs().max() < 0.05
    # float images in [0, 1] are read as uint8 ones are, and the size can be changed
    torch.testing.assert_close(local_contrast(_disc(30)[None].float() / 255), c[:1])
    assert local_contrast(_disc(30)[None], (32, 32)).shape == (1, 32, 32)


def test_the_tone_map_peaks_on_the_finding_and_is_zero_without_contrast() -> None:
    dark = tone_map(_disc(30)[None], "dark")[0]
    assert dark.max() == pytest.approx(1.0) and dark.min() >= 0
    assert dark[_inside()].mean() > 0.6 > 0.05 > dark[~_inside(radius=20)].max()
    # the same image seen for a bright finding: nothing on the disc
    assert tone_map(_disc(30)[None], "bright")[0][_inside(radius=6)].max() < 0.05
    assert tone_map(_disc(230)[None], "bright")[0][_inside()].mean() > 0.6
    flat = tone_map(torch.full((1, 3, SIZE, SIZE), 90, dtype=torch.uint8), "dark")
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-4


def test_the_tone_is_learned_from_labels_and_maps_alone() -> None:
    blob = _inside(radius=12).float()  # a CAM a little wider than the disc
    imgs = torch.stack([_disc(30), _disc(40), _disc(230), _disc(128)])
    labels = torch.tensor([0, 0, 1, 1])  # 1: background, whose images do not count
    maps = blob.expand(4, -1, -1)
    tone, mean = learn_tone([tone_evidence(imgs, labels, maps, 1)])
    assert tone == "dark" and mean > 0.1
    bright = torch.stack([_disc(230), _disc(200)])
    assert learn_tone([tone_evidence(bright, torch.tensor([0, 0]), maps[:2], 1)])[0] == "bright"
    # no finding image, or maps without weight: nothing to learn from
    assert learn_tone([tone_evidence(imgs, torch.tensor([1, 1, 1, 1]), maps, 1)]) == (None, 0.0)
    assert learn_tone([tone_evidence(imgs, labels, torch.zeros_like(maps), 1)]) == (None, 0.0)
    assert learn_tone([]) == (None, 0.0)


def test_with_tone_is_the_weighted_geometric_mean() -> None:
    imgs = _disc(30)[None]
    soft = torch.rand(1, SIZE, SIZE)
    assert with_tone(soft, imgs, "dark", 0.0) is soft
    torch.testing.assert_close(with_tone(soft, imgs, "dark", 0.5), (soft * tone_map(imgs, "dark")).sqrt())


def test_the_consensus_with_the_tone_hugs_the_dark_finding() -> None:
    # two members see a wide blob over a dark disc: the tone map turns the blob into the disc
    blob = _inside(radius=20).float()
    maps = torch.stack([blob[None] * 0.9, blob[None] * 0.7])  # (M=2, B=1, S, S)
    a = _analysis(maps, [[LESION], [LESION]])
    a.inputs = _disc(30)[None].float() / 255.0
    plain = ConsensusConfig(fusion="mean", threshold=0.4)
    truth = _inside()

    def iou(mask: torch.Tensor) -> float:
        return float((mask & truth).sum() / (mask | truth).sum())

    assert iou(apply_consensus(a, plain, 1).mask[0]) < 0.2  # the blob
    toned = plain.model_copy(update={"tone": "dark", "tone_weight": 0.5})
    assert toned.soft_fused and not plain.soft_fused
    res = apply_consensus(a, toned, 1)
    assert iou(res.mask[0]) > 0.7
    torch.testing.assert_close(res.margin[0], (0.8 * blob * tone_map(a.inputs, "dark")[0]).sqrt() - 0.4)
    # scored at many thresholds from one fusion, as calibration does
    fused = soft_margins(a, toned, 1)
    for t in (0.2, 0.4, 0.6):
        at_t = toned.model_copy(update={"threshold": t})
        torch.testing.assert_close(fused.margin(at_t), apply_consensus(a, at_t, 1).margin, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused with"):
        fused.margin(toned.model_copy(update={"tone": "bright"}))


def test_a_tone_weight_without_a_tone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="tone_weight is 0.5 but tone is not set"):
        ConsensusConfig(fusion="mean", tone_weight=0.5)
    a = _analysis(torch.rand(2, 1, 8, 8), [[LESION], [LESION]])
    a.inputs = torch.rand(1, 3, 8, 8)
    cfg = ConsensusConfig(fusion="mean").model_copy(update={"tone_weight": 0.5})  # copies skip validation
    with pytest.raises(ConfigError, match="tone_weight is 0.5 but consensus.tone is not set"):
        apply_consensus(a, cfg, 1)


def test_tone_fusions_are_named_priced_and_applied() -> None:
    fusions = ["intersection", "mean", "vote", "mean*colour:0.75", "mean+crf:30:5:0.3",
               "mean*colour:0.75+crf:30:5:0.3", "intersection+crf:30:5:0.3"]
    assert tone_fusions([0.3, 0.5], fusions) == [
        "mean*tone:0.3", "mean*tone:0.5", "mean*colour:0.75*tone:0.3", "mean*colour:0.75*tone:0.5",
        "mean*tone:0.3+crf:30:5:0.3", "mean*tone:0.5+crf:30:5:0.3",
        "mean*colour:0.75*tone:0.3+crf:30:5:0.3", "mean*colour:0.75*tone:0.5+crf:30:5:0.3"]
    assert tone_fusions([0.5], ["mean*tone:0.5"]) == []  # not twice
    name = "mean*colour:0.75*tone:0.5+crf:30:5:0.3@agreeing"
    assert (colour_weight(name), tone_weight(name)) == (0.75, 0.5)
    assert (colour_weight("mean*tone:0.5"), tone_weight("mean*colour:0.75")) == (None, None)
    update = consensus_update(ConsensusConfig(tone="dark"), name)
    assert (update["fusion"], update["tone_weight"], update["colour_weight"]) == ("mean", 0.5, 0.75)
    assert update["crf"].iterations == 5 and update["labelled_members"] == "agreeing"
    assert variant_cost(MapConfig(), "mean*tone:0.5") == pytest.approx(1 + TONE_MS / REFERENCE.forward_ms)


def test_train_learns_the_tone_tries_it_and_records_the_evidence(tmp_path) -> None:
    from conftest import write_blob_dataset

    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=6)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=32,
                            pretrained=False, mc_samples=2, map_candidates=["plain"],
                            refine_candidates=["none"], min_masks_to_choose=1, val_fraction=0.4,
                            colour_weights=[], tone_weights=[0.3, 0.5]))
    cal = json.loads((run / "calibration.json").read_text())
    # which tone depends on where the one-epoch models look; it follows the evidence's sign
    mean = cal["tone"]["mean_local_contrast_under_maps"]
    assert mean != 0 and cal["tone"]["tone"] == ("dark" if mean > 0 else "bright")
    assert cal["tone"]["weights_tried"] == [0.3, 0.5]
    cands = cal["selection"]["candidates"]
    assert {"plain+mean*tone:0.3", "plain+mean*tone:0.5"} <= set(cands)
    assert cands["plain+mean*tone:0.5"]["relative_cost"] == round(1 + TONE_MS / REFERENCE.forward_ms, 3)
    cfg = read_run_config(run)
    assert cfg.consensus.tone == cal["tone"]["tone"]
    assert cfg.consensus.tone_weight == (tone_weight(cal["selection"]["fusion"]) or 0.0)


def test_no_tone_is_learned_with_no_tone_weights_or_no_masks(tmp_path) -> None:
    from conftest import write_blob_dataset

    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=6)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=32,
                            pretrained=False, mc_samples=2, map_candidates=["plain"],
                            refine_candidates=["none"], min_masks_to_choose=1, val_fraction=0.4,
                            colour_weights=[], tone_weights=[]))
    cal = json.loads((run / "calibration.json").read_text())
    assert "tone" not in cal and not any("tone" in c for c in cal["selection"]["candidates"])
    cfg = read_run_config(run)
    assert cfg.consensus.tone is None and cfg.consensus.tone_weight == 0.0


def test_tone_weights_outside_zero_to_one_name_the_option() -> None:
    from pixelvote.train.config import TrainConfig

    with pytest.raises(ConfigError, match="--tone-weights 1: the tone map's weights"):
        TrainConfig(data=".", out=".", tone_weights=[1.0])
