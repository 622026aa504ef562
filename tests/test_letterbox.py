"""`train --resize letterbox`: images keep their aspect ratio in the model input, and every map comes back
onto the image from the part of the input that covers it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelvote.data.transforms import content_box, crop_content, fit_image, resize_mask, resize_uint8
from pixelvote.errors import ConfigError
from pixelvote.explain.analyze import upsample
from tests.conftest import mask_iou, scored_masks, val_manifest, write_blob_dataset


def test_content_box_keeps_the_aspect_ratio_and_centres_the_image():
    assert content_box((256, 400), 224, "letterbox") == (40, 0, 143, 224)  # a fire video frame
    assert content_box((400, 256), 224, "letterbox") == (0, 40, 224, 143)
    assert content_box((300, 300), 224, "letterbox") == (0, 0, 224, 224)
    assert content_box((256, 400), 224, "squash") == (0, 0, 224, 224)
    assert content_box((10, 5000), 64, "letterbox") == (31, 0, 1, 64)  # never an empty box
    with pytest.raises(ConfigError, match="letterbox"):
        content_box((10, 20), 32, "letterbx")


def test_fit_image_pads_with_the_mean_colour_around_the_resized_image():
    img = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    x = fit_image(img, 32, "letterbox")
    top, left, h, w = content_box((48, 64), 32, "letterbox")
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and (top, left, h, w) == (4, 0, 24, 32)
    assert torch.equal(x[:, top:top + h, left:left + w], resize_uint8(img, (h, w)))
    pad = torch.cat([x[:, :top], x[:, top + h:]], 1)
    assert torch.equal(pad, torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1).expand_as(pad))
    assert torch.equal(fit_image(img, 32), resize_uint8(img, (32, 32)))  # squash is the old resize


@pytest.mark.parametrize("mode", ["squash", "letterbox"])
def test_a_mask_placed_on_the_input_comes_back_onto_the_image(mode):
    """What annotate and evaluate rely on: crop_content + resize is the inverse of fit_image's placement."""
    truth = np.zeros((90, 200), bool)
    truth[20:60, 120:180] = True
    placed = resize_mask(truth, 64, mode)
    assert placed.shape == (64, 64)
    if mode == "letterbox":
        top, _, h, _ = content_box(truth.shape, 64, mode)
        assert not placed[:top].any() and not placed[top + h:].any()
    back = upsample(crop_content(placed.float(), truth.shape, mode), truth.shape).numpy() > 0.5
    assert (back & truth).sum() / (back | truth).sum() > 0.85
    # without the crop the letterboxed mask lands in the wrong place
    if mode == "letterbox":
        wrong = upsample(placed.float(), truth.shape).numpy() > 0.5
        assert (wrong & truth).sum() / (wrong | truth).sum() < 0.7


@pytest.fixture(scope="module")
def letterboxed(tmp_path_factory):
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    root = tmp_path_factory.mktemp("letterbox")
    data = write_blob_dataset(root / "data", per_class=12, size=(40, 72))
    run = train(TrainConfig(data=data, out=root / "run", preset="tiny", epochs=2, image_size=64,
                            pretrained=False, mc_samples=4, resize="letterbox"))
    return root, data, run


def test_a_letterbox_run_annotates_and_evaluates_the_same_masks(letterboxed, tmp_path):
    from pixelvote.engine.annotate import annotate
    from pixelvote.evaluate.run import evaluate_run
    from pixelvote.models.checkpoint import load_run

    _, data, run = letterboxed
    assert json.loads((run / "run.json").read_text())["resize"] == "letterbox"
    assert load_run(run)[0].resize == "letterbox"
    m = evaluate_run(run, data, tmp_path / "report", num_workers=0, progress=False, max_gallery=2)
    annotate(run, val_manifest(run, tmp_path / "val.csv"), tmp_path / "ann",
             mc_samples=m["config"]["mc_samples"], num_workers=0, progress=False)
    meta = json.loads((tmp_path / "ann" / "annotate.json").read_text())
    assert meta["resize"] == "letterbox"
    scored = 0
    for row, rec, pred, truth in scored_masks(m, tmp_path / "ann", data):
        unc = np.asarray(Image.open(tmp_path / "ann" / rec["uncertainty"]))
        assert pred.shape == unc.shape == truth.shape == (40, 72)
        assert row["iou"] == pytest.approx(mask_iou(pred, truth), abs=1e-9)
        scored += 1
    assert scored > 0


def test_the_segmenter_learns_on_the_runs_letterboxed_inputs(letterboxed, tmp_path):
    from pixelvote.engine.annotate import annotate
    from pixelvote.segment.data import SegDataset, select_examples
    from pixelvote.segment.train import SegConfig, train_segmenter

    _, data, run = letterboxed
    annotate(run, data / "images", tmp_path / "ann", mc_samples=2, num_workers=0, progress=False, labels=True)
    seg = train_segmenter(tmp_path / "ann", tmp_path / "seg",
                          cfg=SegConfig(epochs=1, image_size=64, mode="all"), pretrained=False)
    assert json.loads((seg / "segmenter.json").read_text())["resize"] == "letterbox"
    examples = [e for e in select_examples(tmp_path / "ann", background="normal", mode="all")
                if e.mask is not None]
    assert examples
    x, target, weight = SegDataset(examples, 32, resize="letterbox")[0]
    top, _, h, _ = content_box((40, 72), 32, "letterbox")
    assert top > 0 and not target[:top].any() and not target[top + h:].any()
    mean_colour = torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(x[:, :top], mean_colour.expand(3, top, 32))


def test_a_bad_resize_mode_is_a_clear_error(tmp_path):
    from pixelvote.train.config import TrainConfig

    with pytest.raises(ValueError, match="letterbox"):
        TrainConfig(data=tmp_path, out=tmp_path / "run", resize="pad")


def test_annotate_maps_the_content_box_onto_the_whole_image(letterboxed, tmp_path, monkeypatch):
    """A margin that is positive on the left half of the letterboxed image (and nowhere else) becomes a mask
    of the image's whole left half: the padding rows are cut away before the resize."""
    import pixelvote.engine.annotate as ann

    _, data, run = letterboxed
    real = ann.apply_consensus

    def left_half(a, cfg, bg):
        res = real(a, cfg, bg)
        top, left, h, w = content_box((40, 72), res.margin.shape[-1], "letterbox")
        margin = torch.full_like(res.margin, -1.0)
        margin[:, top:top + h, left:left + w // 2] = 1.0
        res.margin = margin
        return res

    monkeypatch.setattr(ann, "apply_consensus", left_half)
    image = next((data / "images" / "lesion").iterdir())
    ann.annotate(run, image.parent, tmp_path / "ann", mc_samples=2, num_workers=0, progress=False,
                 labels=False)
    rec = json.loads((tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()[0])
    mask = np.asarray(Image.open(tmp_path / "ann" / rec["mask"])) > 0
    expected = np.zeros((40, 72), bool)
    expected[:, :36] = True
    assert (mask & expected).sum() / (mask | expected).sum() > 0.95


def test_letterbox_warns_when_the_aspect_ratio_alone_tells_the_classes_apart(tmp_path, caplog):
    """Fire's case: its fire photos are rarely square and its fire-free images mostly are, so the padding
    hands the classifiers the class. Training with letterbox there warns with the fix; squash, or classes
    of the same shapes, do not."""
    import logging

    import pixelvote.train.loop as loop
    from pixelvote.data.dataset import load_dataset
    from pixelvote.train.config import TrainConfig

    same = load_dataset(write_blob_dataset(tmp_path / "same", per_class=6, size=(40, 72))).samples
    mixed = load_dataset(write_blob_dataset(tmp_path / "mixed", per_class=6, size=(40, 72))).samples
    for p in (tmp_path / "mixed" / "images" / "normal").iterdir():  # normals square, lesions not
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(p)

    def cfg(data, resize):
        return TrainConfig(data=data, out=tmp_path / "run", preset="tiny", resize=resize)

    with caplog.at_level(logging.WARNING, logger="pixelvote.train.loop"):
        message = loop.warn_aspect_shortcut(mixed, cfg(tmp_path / "mixed", "letterbox"))
    assert message is not None and "100%" in message and "'normal'" in message
    assert "--resize squash" in message
    assert message in caplog.text
    assert loop.warn_aspect_shortcut(mixed, cfg(tmp_path / "mixed", "squash")) is None
    assert loop.warn_aspect_shortcut(same, cfg(tmp_path / "same", "letterbox")) is None
