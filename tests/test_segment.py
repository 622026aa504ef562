from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelvote.errors import CheckpointError, DataError
from pixelvote.segment.data import SegDataset, select_examples
from pixelvote.segment.train import SegConfig, load_segmenter, predict, train_segmenter


def _out(tmp_path, n=6):
    out = tmp_path / "out"
    for d in ("masks", "uncertainty", "img"):
        (out / d).mkdir(parents=True)
    (out / "annotate.json").write_text(json.dumps({"classes": ["lesion", "normal"], "background": "normal"}))
    recs = []
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((40, 50)) * 60).astype(np.uint8)
        m = np.zeros((40, 50), np.uint8)
        label = "lesion" if i % 3 else "normal"
        if label == "lesion":
            img[10:25, 10:30] += 150
            m[10:25, 10:30] = 255
        Image.fromarray(img).save(out / "img" / f"{i}.png")
        Image.fromarray(m).save(out / "masks" / f"{i}.png")
        unc = np.zeros((40, 50), np.uint8)
        unc[0:5, :] = 200  # very uncertain top rows
        Image.fromarray(unc).save(out / "uncertainty" / f"{i}.png")
        recs.append({"image": str(out / "img" / f"{i}.png"), "key": str(i), "mask": f"masks/{i}.png",
                     "uncertainty": f"uncertainty/{i}.png", "label": label, "flagged": i == 5,
                     **({"reviewed": True} if i == 4 else {})})
    (out / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def test_example_selection_modes(tmp_path):
    out = _out(tmp_path)
    conf = select_examples(out, background="normal")
    assert len(conf) == 5  # the flagged, unreviewed image is left out
    assert sum(e.mask is None for e in conf) == 2  # background images are negatives
    assert [e.weight for e in conf if e.reviewed] == [3.0]
    assert len(select_examples(out, background="normal", mode="reviewed")) == 1
    assert len(select_examples(out, background="normal", mode="all")) == 6
    with pytest.raises(DataError, match="no annotations.jsonl"):
        select_examples(tmp_path, background="normal")


def test_uncertain_pixels_are_ignored_not_background(tmp_path):
    out = _out(tmp_path)
    ex = [e for e in select_examples(out, background="normal") if e.mask is not None and not e.reviewed][0]
    x, target, weight = SegDataset([ex], 50)[0]
    assert x.shape == (3, 50, 50) and target.shape == (50, 50)
    assert float(weight[:5].max()) == 0.0  # uncertain band at the top
    assert float(weight[30:, 40:].min()) == 1.0  # certain background counts
    edge = (target > 0) & (weight == 0)
    assert edge.any()  # the mask's edge band is ignored
    reviewed = [e for e in select_examples(out, background="normal") if e.reviewed][0]
    _, _, w = SegDataset([reviewed], 50)[0]
    assert float(w.min()) == 3.0  # reviewed masks are trusted everywhere


def test_train_save_load_predict(tmp_path):
    out = _out(tmp_path)
    seg = train_segmenter(out, tmp_path / "seg", cfg=SegConfig(epochs=2, image_size=64, batch_size=4),
                          pretrained=False, device="cpu")
    cfg = json.loads((seg / "segmenter.json").read_text())
    assert cfg["background"] == "normal" and cfg["examples"] == 5
    model, scfg = load_segmenter(seg, device="cpu")
    p = predict(model, torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert p.shape == (2, 64, 64) and 0 <= float(p.min()) and float(p.max()) <= 1
    # an ensemble's input of another size (48 px: the FPN takes multiples of 32 only) is resized to the
    # segmenter's size and its probability back
    x48 = torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8)
    x64 = torch.nn.functional.interpolate(x48.float(), size=(64, 64), mode="bilinear", antialias=True,
                                          align_corners=False)  # predict takes 0-255 floats too
    p48 = predict(model, x48)
    assert p48.shape == (2, 48, 48)
    back = torch.nn.functional.interpolate(predict(model, x64)[:, None], size=(48, 48), mode="bilinear",
                                           align_corners=False)[:, 0]
    assert torch.allclose(p48, back, atol=1e-4)
    (seg / "segmenter.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_segmenter(seg)


def test_the_crf_is_on_by_default_where_it_is_installed(tmp_path, monkeypatch):
    from pixelvote.errors import ConfigError
    from pixelvote.refine import crf

    out = _out(tmp_path)
    cfg = SegConfig(epochs=1, image_size=64, batch_size=4)
    for installed in (True, False):
        monkeypatch.setattr(crf, "available", lambda installed=installed: installed)
        seg = train_segmenter(out, tmp_path / f"seg{installed}", cfg=cfg, pretrained=False, device="cpu")
        assert json.loads((seg / "segmenter.json").read_text())["crf"] is installed
    with pytest.raises(ConfigError, match="pydensecrf2"):  # asked for explicitly, it is an error
        train_segmenter(out, tmp_path / "seg", cfg=cfg.model_copy(update={"crf": True}), pretrained=False,
                        device="cpu")


def test_segmenters_saved_before_the_light_decoder_still_load(tmp_path):
    """segmenter.json without the decoder fields means smp's defaults (256/128) and flip averaging."""
    from pixelvote.models.checkpoint import save_weights
    from pixelvote.segment.model import Segmenter

    old = Segmenter("efficientnet_lite0", pretrained=False, pyramid_channels=256, segmentation_channels=128)
    seg = tmp_path / "seg"
    seg.mkdir()
    save_weights(seg / "segmenter.safetensors", old)
    cfg = SegConfig(image_size=64).model_dump(mode="json")
    for key in ("pyramid_channels", "segmentation_channels", "flip_tta"):
        cfg.pop(key)
    (seg / "segmenter.json").write_text(json.dumps(cfg))
    model, loaded = load_segmenter(seg, device="cpu")
    assert (loaded.pyramid_channels, loaded.segmentation_channels, loaded.flip_tta) == (256, 128, True)
    x = (torch.rand(2, 3, 64, 64) * 255).to(torch.uint8)
    with torch.no_grad():
        ref = torch.sigmoid(old.eval()(x.float() / 255))
        ref = 0.5 * (ref + torch.sigmoid(old(x.float().flip(-1) / 255)).flip(-1))
    assert torch.allclose(predict(model, x), ref, atol=1e-4)  # batch norms folded, same output


def test_the_default_segmenter_is_light() -> None:
    from pixelvote.segment.model import Segmenter

    light = Segmenter("efficientnet_lite0", pretrained=False)
    heavy = Segmenter("efficientnet_lite0", pretrained=False, pyramid_channels=256, segmentation_channels=128)
    n = lambda m: sum(p.numel() for p in m.net.decoder.parameters())  # noqa: E731
    assert not light.flip_tta and n(light) * 10 < n(heavy)


def test_decoder_choices_map_to_channels_and_typos_are_clear() -> None:
    from pixelvote.errors import ConfigError
    from pixelvote.segment.train import decoder_settings

    assert decoder_settings("light") == {"pyramid_channels": 64, "segmentation_channels": 32}
    assert decoder_settings("full") == {"pyramid_channels": 256, "segmentation_channels": 128}
    with pytest.raises(ConfigError, match="full"):
        decoder_settings("ful")


def test_augmentation_moves_image_target_and_weight_together(tmp_path):
    out = _out(tmp_path)
    ex = [e for e in select_examples(out, background="normal") if e.mask is not None and not e.reviewed][0]
    plain = SegDataset([ex], 64)[0]
    ds = SegDataset([ex], 64, augment=True)
    torch.manual_seed(0)
    changed = 0
    for _ in range(12):
        x, target, weight = ds[0]
        assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
        assert target.shape == weight.shape == (64, 64)
        assert set(target.unique().tolist()) <= {0.0, 1.0}
        assert set(weight.unique().tolist()) <= {0.0, 1.0}  # nearest neighbour: no blended weights
        grey = x.float().mean(0)
        fg = (target > 0) & (weight > 0)
        bg = (target == 0) & (weight > 0)
        # the bright square and its target stay on the same pixels (the colour jitter keeps them apart)
        assert grey[fg].mean() > grey[bg].mean() + 60
        changed += not torch.equal(target, plain[1])
    assert changed >= 10  # it does augment
    assert torch.equal(ds.cache[0][1], plain[1])  # the cached example itself is never changed


def _lite0_run(tmp_path, name="efficientnet_lite0_os16"):
    """A run folder whose one member is an EfficientNet-Lite0 (random weights) - a stand-in for a
    fine-tuned one."""
    from pixelvote.models.checkpoint import (
        MemberConfig,
        RunConfig,
        member_file,
        save_run_config,
        save_weights,
    )
    from pixelvote.models.member import build_member

    run = tmp_path / "run"
    (run / "members").mkdir(parents=True)
    torch.manual_seed(5)
    member = build_member(name, 2, pretrained=False)
    save_weights(run / member_file(0, name), member)
    save_run_config(run, RunConfig(classes=["lesion", "normal"], background="normal",
                                   members=[MemberConfig(name=name)]))
    return run, member


def test_the_encoder_starts_from_the_runs_member_of_the_same_network(tmp_path):
    from pixelvote.segment.model import Segmenter, encoder_from_run

    run, member = _lite0_run(tmp_path)
    name, state = encoder_from_run(run, "efficientnet_lite0")  # output stride does not change the weights
    assert name == "efficientnet_lite0_os16"
    seg = Segmenter("efficientnet_lite0", pretrained=False)
    seg.load_encoder(state)
    ref = member.backbone.net.state_dict()
    enc = seg.net.encoder.model.state_dict()
    assert len(enc) > 100 and all(torch.equal(v, ref[k]) for k, v in enc.items())
    assert encoder_from_run(run, "efficientnet_lite1") is None  # no member of that network

    out = _out(tmp_path)  # its annotate.json names no run: --run is what points at the members
    cfg = SegConfig(epochs=1, image_size=64, batch_size=4, lr=1e-9)  # the weights barely move
    a = train_segmenter(out, tmp_path / "a", run=run, cfg=cfg, pretrained=False, device="cpu")
    meta = json.loads((a / "segmenter.json").read_text())
    assert meta["encoder_from"].startswith("member efficientnet_lite0_os16 of ")
    from safetensors.torch import load_file

    saved = load_file(str(a / "segmenter.safetensors"))
    convs = [k for k in ref if k.endswith("conv_pw.weight")]
    assert convs and all(torch.allclose(saved[f"net.encoder.model.{k}"], ref[k], atol=1e-6) for k in convs)
    plain = cfg.model_copy(update={"encoder_init": "imagenet"})
    meta = json.loads((train_segmenter(out, tmp_path / "b", run=run, cfg=plain, pretrained=False,
                                       device="cpu") / "segmenter.json").read_text())
    assert meta["encoder_from"] == "random"
    with pytest.raises(CheckpointError, match="not a pixelvote run"):  # a wrong --run is named, not skipped
        train_segmenter(out, tmp_path / "e", run=tmp_path, cfg=cfg, pretrained=False, device="cpu")
    # without --run, the run recorded in annotate.json is used while it exists
    ann = json.loads((out / "annotate.json").read_text())
    (out / "annotate.json").write_text(json.dumps({**ann, "run": str(run)}))
    meta = json.loads((train_segmenter(out, tmp_path / "c", cfg=cfg, pretrained=False,
                                       device="cpu") / "segmenter.json").read_text())
    assert meta["encoder_from"].startswith("member efficientnet_lite0_os16")
    (out / "annotate.json").write_text(json.dumps({**ann, "run": str(tmp_path / "gone")}))
    meta = json.loads((train_segmenter(out, tmp_path / "d", cfg=cfg, pretrained=False,
                                       device="cpu") / "segmenter.json").read_text())
    assert meta["encoder_from"] == "random"


class _Brightness(torch.nn.Module):
    """A stand-in segmenter whose probability is the red channel's brightness."""

    flip_tta = False

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x[:, 0].clamp(1e-4, 1 - 1e-4)) * self.scale


def _halo_run(tmp_path, n=4):
    """A run whose validation lesions (red 240) sit in a halo the truth leaves out (red 200) on a dark
    background (60): the best mask threshold for red brightness lies between 200/255 and 240/255."""
    from pixelvote.models.checkpoint import MemberConfig, RunConfig, save_run_config

    data = tmp_path / "data"
    paths = []
    for label in ("lesion", "normal"):
        (data / "images" / label).mkdir(parents=True)
        (data / "masks" / label).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64, 3), 60, np.uint8)
            m = np.zeros((64, 64), np.uint8)
            if label == "lesion":
                img[12 + i:44 + i, 12:44] = 200
                img[20 + i:36 + i, 20:36] = 240
                m[20 + i:36 + i, 20:36] = 255
            Image.fromarray(img).save(data / "images" / label / f"{label}{i}.png")
            Image.fromarray(m).save(data / "masks" / label / f"{label}{i}.png")
            paths.append(str((data / "images" / label / f"{label}{i}.png").resolve()))
    run = tmp_path / "run"
    run.mkdir()
    save_run_config(run, RunConfig(classes=["lesion", "normal"], background="normal", image_size=64,
                                   members=[MemberConfig(name="tiny_cnn_a")], data={"root": str(data)}))
    (run / "split.json").write_text(json.dumps({"train": [], "val": paths[1:], "test": []}))
    return run


def test_the_segmenter_thresholds_are_chosen_on_the_runs_validation_masks(tmp_path):
    from pixelvote.refine import crf
    from pixelvote.refine.crf import CRFConfig
    from pixelvote.segment.calibrate import choose_thresholds

    run = _halo_run(tmp_path)
    crf_cfg = CRFConfig() if crf.available() else None
    s = choose_thresholds(_Brightness(), run, image_size=64, resize="squash", crf_cfg=crf_cfg)
    assert s["images"] == 3  # validation lesions with masks: not the normal images, nor lesion0 (training)
    assert s["threshold"] == 0.8 and s["threshold_iou"] == pytest.approx(1.0)
    assert s["plain"]["0.5"] == pytest.approx(16 * 16 / (32 * 32))  # the halo counted as lesion
    if crf_cfg is not None:
        assert set(s["crf"]) == {str(round(0.05 * i, 2)) for i in range(1, 13)}  # up to 0.6 only
        assert s["crf_threshold_iou"] == max(s["crf"].values()) == s["crf"][str(s["crf_threshold"])]
        # every iteration count (2, 3, 5; the run's 5 among them) with every cutoff; the best one is kept
        assert set(s["crf_settings"]) == {f"{n} iterations, cutoff {c}"
                                          for n in (2, 3, 5) for c in (0.1, 0.3, 0.5)}
        chosen = f"{s['crf_iterations']} iterations, cutoff {s['crf_cutoff']}"
        assert s["crf_threshold_iou"] == max(s["crf_settings"].values()) == s["crf_settings"][chosen]
    else:
        assert s["crf_threshold"] is None


def test_segment_train_saves_the_chosen_thresholds_or_says_why_it_kept_them(tmp_path, monkeypatch):
    from pixelvote.segment import train as seg_train

    run = _halo_run(tmp_path)
    out = _out(tmp_path)
    cfg = SegConfig(epochs=1, image_size=64, batch_size=4, encoder_init="imagenet", crf=False)
    seg = train_segmenter(out, tmp_path / "seg", cfg=cfg, pretrained=False, device="cpu")  # no run known
    saved = json.loads((seg / "segmenter.json").read_text())
    assert (saved["threshold"], saved["crf_threshold"]) == (0.5, 0.5)
    assert saved["threshold_source"] == "kept (no run to take validation masks from (pass --run))"

    monkeypatch.setattr(seg_train, "load_segmenter", lambda *a, **k: (_Brightness(), SegConfig(
        **{**saved, "threshold_source": "default"})))
    summary = seg_train.calibrate_segmenter(seg, run)
    saved = json.loads((seg / "segmenter.json").read_text())
    assert saved["threshold"] == summary["threshold"] == 0.8
    assert saved["threshold_source"].startswith("validation masks of ")
    assert "3 images" in saved["threshold_source"]
    assert json.loads((seg / "calibration.json").read_text())["plain"]["0.8"] == pytest.approx(1.0)

    import shutil

    shutil.rmtree(tmp_path / "data")  # the run's data moved away: the thresholds stay, and why is saved
    seg_train.calibrate_segmenter(seg, run)
    saved = json.loads((seg / "segmenter.json").read_text())
    assert saved["threshold"] == 0.8
    assert saved["threshold_source"].startswith("kept (the run's validation images cannot be read (")
    assert "dataset not found" in saved["threshold_source"]


def _crf_segmenter_on_halo_run(tmp_path):  # type: ignore[no-untyped-def]
    """The halo run, and a one-epoch segmenter with the CRF on, trained without a run (nothing chosen yet):
    ``(run, segmenter folder, its segmenter.json)``."""
    run = _halo_run(tmp_path)
    cfg = SegConfig(epochs=1, image_size=64, batch_size=4, encoder_init="imagenet", crf=True)
    seg = train_segmenter(_out(tmp_path), tmp_path / "seg", cfg=cfg, pretrained=False, device="cpu")
    return run, seg, json.loads((seg / "segmenter.json").read_text())


@pytest.mark.skipif("not __import__('pixelvote.refine.crf', fromlist=['x']).available()")
def test_calibration_keeps_the_segmenters_crf_only_where_it_beats_the_plain_mask(tmp_path, monkeypatch):
    from pixelvote.segment import calibrate as seg_calibrate
    from pixelvote.segment import train as seg_train

    run, seg, saved = _crf_segmenter_on_halo_run(tmp_path)
    assert saved["use_crf"] is None and SegConfig(**saved).refines  # no run: nothing chosen, the CRF stays
    monkeypatch.setattr(seg_train, "load_segmenter", lambda *a, **k: (_Brightness(), SegConfig(**saved)))
    # the halo run: thresholded at 0.8 the plain mask is exact (IoU 1.0), so no CRF can beat it
    summary = seg_train.calibrate_segmenter(seg, run)
    saved = json.loads((seg / "segmenter.json").read_text())
    assert summary["threshold_iou"] == pytest.approx(1.0) and summary["crf_threshold_iou"] < 0.99
    assert summary["mask"] == "plain" and saved["use_crf"] is False and not SegConfig(**saved).refines
    assert json.loads((seg / "calibration.json").read_text())["mask"] == "plain"

    def crf_wins(*a, **k):  # type: ignore[no-untyped-def]
        return {"images": 3, "threshold": 0.5, "threshold_iou": 0.30, "crf_threshold": 0.05,
                "crf_threshold_iou": 0.35}

    monkeypatch.setattr(seg_calibrate, "choose_thresholds", crf_wins)
    summary = seg_train.calibrate_segmenter(seg, run)
    saved = json.loads((seg / "segmenter.json").read_text())
    assert summary["mask"] == "crf" and saved["use_crf"] is True and SegConfig(**saved).refines
    assert not SegConfig(crf=False, use_crf=True).refines  # --no-crf wins over any choice


@pytest.mark.skipif("not __import__('pixelvote.refine.crf', fromlist=['x']).available()")
def test_the_crf_iterations_scored_are_the_ones_annotate_runs(tmp_path):
    """Each CRF setting calibration scores is the mask the segmenter then makes with it: the run's CRF with
    the segmenter's iterations, its unary threshold, and the cutoff on the refined probability."""
    from pixelvote.evaluate.selection import iou_over_grid
    from pixelvote.refine.crf import CRFConfig, dense_crf
    from pixelvote.segment.calibrate import iou_rows
    from pixelvote.segment.train import refined_margin

    x = torch.full((2, 3, 48, 48), 20, dtype=torch.uint8)
    x[0, 0, 10:30, 8:40] = 90  # faint: probability 0.35, only a low unary threshold keeps it
    x[1, 0, 16:40, 16:36] = 200
    truth = torch.zeros(2, 48, 48, dtype=torch.bool)
    truth[0, 12:28, 10:38] = True
    truth[1, 18:38, 18:34] = True
    prob = torch.sigmoid(_Brightness()(x.float() / 255))
    run_crf = CRFConfig(iterations=5)
    _, refined = iou_rows(prob, x, list(truth), lambda s, t: s, run_crf, iterations=(1, 5),
                          cutoffs=(0.3, 0.5))
    assert set(refined) == {(1, 0.3), (1, 0.5), (5, 0.3), (5, 0.5)}
    i10 = 1  # GRID[1] = 0.1, the unary threshold
    for (n, c), rows in refined.items():
        scfg = SegConfig(crf=True, crf_threshold=0.1, crf_iterations=n, crf_cutoff=c)
        margin = refined_margin(prob, x, scfg, run_crf)
        assert scfg.crf_settings(run_crf).iterations == n and run_crf.iterations == 5  # the run's is kept
        for j in range(2):
            scored = float(iou_over_grid(margin[j], truth[j], (0.0,))[0])
            assert float(rows[j, i10]) == pytest.approx(scored)
    # iterations and cutoff change the masks (one iteration spreads the colour term less than five)
    m1 = refined_margin(prob, x, SegConfig(crf_threshold=0.1, crf_iterations=1, crf_cutoff=0.5), run_crf)
    m5 = refined_margin(prob, x, SegConfig(crf_threshold=0.1, crf_iterations=5, crf_cutoff=0.5), run_crf)
    m1c = refined_margin(prob, x, SegConfig(crf_threshold=0.1, crf_iterations=1, crf_cutoff=0.3), run_crf)
    assert not torch.equal(m1, m5) and torch.allclose(m1c, m1 + 0.2)
    # a segmenter calibrated before this version (no iterations, cutoff 0.5) refines as it did: the run's
    # CRF, its mask above 0.5
    old = SegConfig.model_validate({"crf_threshold": 0.1})
    assert (old.crf_iterations, old.crf_cutoff) == (None, 0.5)
    before = dense_crf(prob, x, run_crf, threshold=0.1) - 0.5
    assert torch.equal(refined_margin(prob, x, old, run_crf), before)


@pytest.mark.skipif("not __import__('pixelvote.refine.crf', fromlist=['x']).available()")
def test_calibration_saves_the_crf_setting_it_chose_and_annotate_uses_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pixelvote.engine.annotate import _use_segmenter
    from pixelvote.refine.crf import CRFConfig
    from pixelvote.segment import train as seg_train

    run, seg, saved = _crf_segmenter_on_halo_run(tmp_path)
    monkeypatch.setattr(seg_train, "load_segmenter", lambda *a, **k: (_Brightness(), SegConfig(**saved)))
    summary = seg_train.calibrate_segmenter(seg, run, crf_iterations=(1, 4))
    saved = json.loads((seg / "segmenter.json").read_text())
    assert {k.split(" iterations")[0] for k in summary["crf_settings"]} == {"1", "4", "5"}  # + the run's 5
    best = max(summary["crf_settings"].items(), key=lambda kv: kv[1])[0]
    assert best == f"{saved['crf_iterations']} iterations, cutoff {saved['crf_cutoff']}"
    assert json.loads((seg / "calibration.json").read_text())["crf_iterations"] == saved["crf_iterations"]
    # annotate refines with what was saved
    scfg = SegConfig(**{**saved, "use_crf": True})
    seen = []
    real = seg_train.refined_margin

    def spy(prob, images, s, run_crf):  # type: ignore[no-untyped-def]
        seen.append((s.crf_settings(run_crf).iterations, s.crf_cutoff, s.crf_threshold))
        return real(prob, images, s, run_crf)

    monkeypatch.setattr(seg_train, "refined_margin", spy)
    x = torch.full((1, 3, 48, 48), 10, dtype=torch.uint8)
    res = SimpleNamespace(margin=torch.full((1, 48, 48), -1.0), foreground=torch.tensor([True]), reasons=[[]])
    _use_segmenter(res, x, _Brightness(), scfg, 0.0, CRFConfig())
    assert seen == [(saved["crf_iterations"], saved["crf_cutoff"], saved["crf_threshold"])]


@pytest.mark.skipif("not __import__('pixelvote.refine.crf', fromlist=['x']).available()")
def test_annotate_and_evaluate_refine_the_segmenter_at_its_chosen_crf_threshold():
    """A faint region (red 80 of 255: probability 0.31) becomes mask where the segmenter's CRF counts 0.1
    as undecided, and not where it counts 0.5 - in annotate and in evaluate alike."""
    from types import SimpleNamespace

    from pixelvote.engine.annotate import _use_segmenter
    from pixelvote.evaluate.run import SEGMENTER_CRF_ROW, _segmenter_margins
    from pixelvote.refine.crf import CRFConfig

    x = torch.full((1, 3, 48, 48), 10, dtype=torch.uint8)
    x[:, 0, 12:36, 12:36] = 80
    areas = {}
    for t in (0.1, 0.5):
        scfg = SegConfig(image_size=64, crf=True, crf_threshold=t)
        res = SimpleNamespace(margin=torch.full((1, 48, 48), -1.0), foreground=torch.tensor([True]),
                              reasons=[[]])
        _use_segmenter(res, x, _Brightness(), scfg, 0.0, CRFConfig())
        _, refined = _segmenter_margins((_Brightness(), scfg), x, torch.tensor([True]),
                                        [SEGMENTER_CRF_ROW], CRFConfig())
        assert torch.equal(res.margin > 0, refined > 0)
        areas[t] = int((refined > 0).sum())
    assert areas[0.1] >= 24 * 24 * 0.9 and areas[0.5] == 0


@pytest.mark.skipif("not __import__('pixelvote.refine.crf', fromlist=['x']).available()")
def test_annotate_refines_only_the_foreground_images_with_the_segmenters_crf(monkeypatch):
    """A background diagnosis keeps no mask, so its CRF pass would be wasted: the CRF sees the others only,
    and they get the mask a batch of their own gets."""
    from types import SimpleNamespace

    from pixelvote.engine.annotate import _use_segmenter
    from pixelvote.refine import crf

    x = torch.full((3, 3, 48, 48), 10, dtype=torch.uint8)
    x[:, 0, 12:36, 12:36] = 200
    scfg = SegConfig(image_size=64, crf=True, crf_threshold=0.3)

    def result(fg: list[bool]) -> SimpleNamespace:
        return SimpleNamespace(margin=torch.full((len(fg), 48, 48), -1.0), foreground=torch.tensor(fg),
                               reasons=[[] for _ in fg])

    alone = result([True])
    _use_segmenter(alone, x[:1], _Brightness(), scfg, 0.0, crf.CRFConfig())
    seen = []
    real = crf.dense_crf
    monkeypatch.setattr(crf, "dense_crf", lambda soft, *a, **k: seen.append(len(soft)) or real(soft, *a, **k))
    res = result([False, True, False])
    _use_segmenter(res, x, _Brightness(), scfg, 0.0, crf.CRFConfig())
    assert seen == [1]
    assert torch.equal(res.margin[1], alone.margin[0]) and int((alone.margin[0] > 0).sum()) > 400
    assert bool((res.margin[[0, 2]] == -1).all()) and res.reasons == [[], [], []]


def test_segmenter_sizes_that_the_fpn_cannot_take_are_a_clear_error(tmp_path):
    import subprocess
    import sys

    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="multiple of 32"):
        SegConfig(image_size=48)
    with pytest.raises(ValidationError, match="greater than or equal to 64"):
        SegConfig(image_size=32)  # its coarsest level would be one pixel: one image alone failed there
    from pixelvote.segment.model import Segmenter

    one = (torch.rand(1, 3, 64, 64) * 255).to(torch.uint8)  # the smallest size takes a batch of one image
    assert predict(Segmenter("efficientnet_lite0", pretrained=False).eval(), one).shape == (1, 64, 64)
    out = _out(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "segment", "train", "--annotations", str(out),
                        "--out", str(tmp_path / "seg"), "--image-size", "100"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--image-size" in p.stderr and "multiple of 32" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "seg").exists()


def test_improve_trains_its_segmenter_at_the_size_nearest_the_runs_that_the_fpn_takes():
    from pixelvote.segment.train import segmenter_size

    assert [segmenter_size(s) for s in (224, 48, 300, 20, 512)] == [224, 64, 288, 64, 512]
    assert all(SegConfig(image_size=segmenter_size(s)).image_size % 32 == 0 for s in range(16, 700, 7))


def test_the_segmenters_thresholds_are_scored_at_each_images_own_size(tmp_path):
    from conftest import write_blob_dataset

    from pixelvote.data.dataset import load_dataset
    from pixelvote.segment.calibrate import _batches
    from pixelvote.train.cache import cache_samples

    ds = load_dataset(write_blob_dataset(tmp_path / "data", per_class=2, size=(40, 64)))
    lesions = [s for s in ds.samples if s.mask is not None]
    val = cache_samples(lesions, ds.classes, 32, full_masks=True)
    (imgs, truths), = list(_batches(val, 8))
    assert imgs.shape == (2, 3, 32, 32)
    assert [tuple(t.shape) for t in truths] == [(40, 64)] * 2 and all(int(t.sum()) == 144 for t in truths)
