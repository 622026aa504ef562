"""The colour prior: P(finding | colour) learned from image-level labels, and how the consensus uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_consensus import LESION, _analysis

from pixelvote.consensus import ConsensusConfig, apply_consensus, soft_margins
from pixelvote.errors import ConfigError
from pixelvote.evaluate.selection import COLOUR_MS, REFERENCE
from pixelvote.refine.colour import ColourPrior, colour_bins, learn_colour_prior, with_colour

RED, GREY, BLUE = (220, 30, 30), (100, 100, 100), (30, 30, 220)


def _image(background: tuple[int, int, int], square: tuple[int, int, int] | None = None,
           size: int = 16) -> torch.Tensor:
    img = torch.tensor(background, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).clone()
    if square is not None:
        img[:, 4:10, 4:10] = torch.tensor(square, dtype=torch.uint8).view(3, 1, 1)
    return img


def _bin(colour: tuple[int, int, int], bins: int = 8) -> int:
    return int(colour_bins(torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1), bins))


def _on_square(size: int = 16) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[3:11, 3:11] = 1.0  # a CAM a little wider than the red square: grey under it too
    return m


def test_the_prior_learns_the_findings_colour_from_labels_and_the_map() -> None:
    # lesions (class 0): a red square on grey, the map on the square; normals (class 1): grey or blue
    imgs = torch.stack([_image(GREY, RED), _image(GREY, RED), _image(GREY), _image(BLUE)])
    labels = torch.tensor([0, 0, 1, 1])
    maps = torch.stack([_on_square(), _on_square(), torch.zeros(16, 16), torch.zeros(16, 16)])
    prior = learn_colour_prior([(imgs[:2], labels[:2], maps[:2]), (imgs[2:], labels[2:], maps[2:])], 1)
    assert prior is not None and prior.bins == 8 and len(prior.probability) == 512
    assert (prior.images, prior.findings) == (4, 2)
    p = prior.probability
    assert p[_bin(RED)] == pytest.approx(1.0, abs=1e-3)  # only in lesions, under the map
    # grey: 28 of 64 weighted pixels of each lesion against half of the normals' pixels
    assert p[_bin(GREY)] == pytest.approx((28 / 64) / (28 / 64 + 0.5), abs=1e-3)
    assert p[_bin(BLUE)] == pytest.approx(0.0, abs=1e-3)  # only in a normal image
    assert p[_bin((10, 250, 10))] == 0.5  # never seen: undecided


def test_no_prior_without_both_classes() -> None:
    imgs = torch.stack([_image(GREY, RED), _image(GREY)])
    maps = torch.stack([_on_square(), torch.zeros(16, 16)])
    assert learn_colour_prior([(imgs, torch.tensor([0, 0]), maps)], 1) is None  # no background image
    assert learn_colour_prior([(imgs, torch.tensor([1, 1]), maps)], 1) is None  # no finding
    # findings whose maps are empty tell nothing either
    assert learn_colour_prior([(imgs, torch.tensor([0, 1]), torch.zeros(2, 16, 16))], 1) is None


def test_a_broken_prior_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="511 values for 8\\^3 colour bins; re-run `pixelvote train`"):
        ColourPrior(probability=[0.5] * 511)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        ColourPrior(probability=[1.5] * 512)
    with pytest.raises(ValueError, match="do not divide 256"):
        ColourPrior(bins=3, probability=[0.5] * 27)
    with pytest.raises(ValueError, match="colour_weight is 0.75 but there is no colour_prior"):
        ConsensusConfig(colour_weight=0.75)


def test_colour_bins_of_uint8_and_float_images_agree() -> None:
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(colour_bins(img), colour_bins(img.float() / 255.0))
    pixel = torch.tensor([255, 0, 31], dtype=torch.uint8).view(1, 3, 1, 1)
    assert int(colour_bins(pixel)) == (7 * 8 + 0) * 8 + 0


def _prior_red() -> ColourPrior:
    p = [0.2] * 512
    p[_bin(RED)] = 0.9
    return ColourPrior(probability=p)


def test_with_colour_is_the_weighted_geometric_mean() -> None:
    prior = _prior_red()
    imgs = torch.stack([_image(GREY, RED)])
    soft = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    table = torch.full((1, 16, 16), 0.2)
    table[0, 4:10, 4:10] = 0.9
    assert torch.equal(with_colour(soft, imgs, prior, 0.0), soft)
    torch.testing.assert_close(with_colour(soft, imgs, prior, 1.0), table)
    torch.testing.assert_close(with_colour(soft, imgs, prior, 0.5), (soft * table).sqrt())
    torch.testing.assert_close(with_colour(soft, imgs.float() / 255, prior, 0.75),
                               soft ** 0.25 * table ** 0.75)


def test_consensus_thresholds_the_map_combined_with_the_prior() -> None:
    # two members see a wide blob over a red square; the prior turns the blob into the square
    img = _image(GREY, RED)
    blob = torch.zeros(16, 16)
    blob[2:12, 2:12] = 0.8
    maps = torch.stack([blob[None], blob[None] * 0.5])  # (M=2, B=1, 16, 16), mean 0.6 on the blob
    a = _analysis(maps, [[LESION], [LESION]])
    a.inputs = img[None].float() / 255.0
    plain = ConsensusConfig(fusion="mean", threshold=0.4)
    assert int(apply_consensus(a, plain, 1).mask.sum()) == 100  # the blob
    coloured = plain.model_copy(update={"colour_weight": 0.5, "colour_prior": _prior_red()})
    res = apply_consensus(a, coloured, 1)
    # sqrt(0.6 * 0.9) = 0.73 on the square, sqrt(0.6 * 0.2) = 0.35 around it
    assert res.mask[0].nonzero().amin(0).tolist() == [4, 4] and int(res.mask.sum()) == 36
    table = torch.full((16, 16), 0.2)
    table[4:10, 4:10] = 0.9
    torch.testing.assert_close(res.margin[0], (a.maps.mean(0)[0] * table).sqrt() - 0.4)
    fused = soft_margins(a, coloured, 1)
    for t in (0.3, 0.5, 0.7):
        at_t = coloured.model_copy(update={"threshold": t})
        torch.testing.assert_close(fused.margin(at_t), apply_consensus(a, at_t, 1).margin, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused with"):
        fused.margin(plain.model_copy(update={"colour_weight": 0.75, "colour_prior": _prior_red()}))
    # a background diagnosis gets no mask, the prior or not
    b = _analysis(maps, [[[0.1, 0.9]], [[0.1, 0.9]]])
    b.inputs = a.inputs
    assert not apply_consensus(b, coloured, 1).mask.any()


def test_a_prior_weight_without_a_prior_is_a_clear_error() -> None:
    a = _analysis(torch.rand(2, 1, 8, 8), [[LESION], [LESION]])
    a.inputs = torch.rand(1, 3, 8, 8)
    cfg = ConsensusConfig(fusion="mean").model_copy(update={"colour_weight": 0.5})  # copies skip validation
    with pytest.raises(ConfigError, match="no colour prior"):
        apply_consensus(a, cfg, 1)


def test_train_learns_the_prior_annotate_uses_it_and_a_weight_without_it_names_the_file(tmp_path) -> None:
    from conftest import write_blob_dataset

    from pixelvote.errors import CheckpointError
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=6)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=32,
                            pretrained=False, mc_samples=2, map_candidates=["plain"],
                            refine_candidates=["none"], min_masks_to_choose=1, val_fraction=0.4))
    cfg = read_run_config(run)
    prior = cfg.consensus.colour_prior
    # grey images: learned from the lesions' bright squares against the normals' noise
    assert prior is not None and prior.images == len(json.loads((run / "split.json").read_text())["train"])
    bright, dark = _bin((200, 200, 200)), _bin((40, 40, 40))
    assert prior.probability[bright] > 0.9 > 0.5 > prior.probability[dark]
    cands = json.loads((run / "calibration.json").read_text())["selection"]["candidates"]
    # the test models have no timing: priced as the offline preset at 32 px (prior and pass scale alike)
    assert "plain+mean*colour:0.75" in cands and cands["plain+mean*colour:0.75"]["relative_cost"] == round(
        1 + COLOUR_MS / REFERENCE.forward_ms, 3)
    raw = json.loads((run / "run.json").read_text())
    # annotate with the prior at full weight: the lesions' bright squares, not the CAM's blobs
    from pixelvote.engine.annotate import annotate

    with_prior = {**raw, "consensus": {**raw["consensus"], "fusion": "mean", "colour_weight": 1.0,
                                       "threshold": 0.5, "refine": "none"}}
    (run / "run.json").write_text(json.dumps(with_prior))
    annotate(run, data / "images" / "lesion", tmp_path / "out", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
    assert len(records) == 6
    lesion = [r for r in records if r["label"] == "lesion"]
    assert lesion
    for r in lesion:  # where the ensemble sees a lesion, the mask is the 12x12 bright square (its edges
        # blurred by the 32-px analysis)
        mask = np.array(Image.open(tmp_path / "out" / r["mask"])) > 0
        truth = np.array(Image.open(data / "masks" / "lesion" / Path(r["image"]).name)) > 0
        assert (mask & truth).sum() / truth.sum() > 0.95 and (mask & truth).sum() / (mask | truth).sum() > 0.5
    raw["consensus"]["colour_weight"], raw["consensus"]["colour_prior"] = 0.5, None
    (run / "run.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="colour_weight is 0.5 but there is no colour_prior") as err:
        read_run_config(run)
    assert "run.json" in str(err.value)


def test_the_papers_rule_has_no_colour_prior() -> None:
    from pixelvote.engine.annotate import resolve_recipe
    from pixelvote.models.checkpoint import RunConfig

    consensus = ConsensusConfig(fusion="mean", colour_weight=0.75, colour_prior=_prior_red())
    cfg = RunConfig(classes=["lesion", "normal"], background="normal", image_size=32, members=[],
                    consensus=consensus)
    assert resolve_recipe(cfg, "run", None, None, None)[0].colour_weight == 0.75
    paper = resolve_recipe(cfg, "paper", None, None, None)[0]
    assert paper.colour_weight == 0.0 and paper.fusion == "intersection" and not paper.soft_fused


def test_no_prior_is_learned_where_no_recipe_is_chosen(tmp_path) -> None:
    from conftest import write_blob_dataset

    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=6)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=32,
                            pretrained=False, mc_samples=2, map_candidates=["plain"],
                            refine_candidates=["none"], min_masks_to_choose=50, val_fraction=0.4))
    cal = json.loads((run / "calibration.json").read_text())
    assert "selection" not in cal and "threshold_sweep" in cal  # too few masks: the threshold alone
    assert read_run_config(run).consensus.colour_prior is None
