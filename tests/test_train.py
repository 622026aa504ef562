from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pixelvote.train.loop as loop
from pixelvote.errors import DataError
from pixelvote.models.checkpoint import load_run
from pixelvote.train.config import TrainConfig


def _cfg(data, out, **kw):
    base = dict(data=data, out=out, preset="tiny", epochs=3, image_size=32, pretrained=False, mc_samples=3,
                batch_size=8, patience=10)
    base.update(kw)
    return TrainConfig(**base)


def test_interrupted_run_is_usable_and_resume_matches_an_uninterrupted_run(blob_dataset, tmp_path,
                                                                           monkeypatch):
    full = loop.train(_cfg(blob_dataset, tmp_path / "full"))
    real = loop.evaluate_member
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # during the first member's second epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate_member", interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(blob_dataset, tmp_path / "cut"))
    ens, _ = load_run(tmp_path / "cut")  # the last checkpoint is a usable run
    assert [m.name for m in ens.members] == ["tiny_cnn_a"]
    monkeypatch.setattr(loop, "evaluate_member", real)
    loop.train(_cfg(blob_dataset, tmp_path / "cut", epochs=99), resume=True)  # settings come from the run
    hist = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [(h["member"], h["epoch"]) for h in hist] == [(n, e) for n in ("tiny_cnn_a", "tiny_cnn_b")
                                                         for e in (1, 2, 3)]
    a, _ = load_run(full)
    b, _ = load_run(tmp_path / "cut")
    for ma, mb in zip(a.members, b.members, strict=True):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
            assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


def test_mc_variance_term_changes_training(blob_dataset, tmp_path):
    a = loop.train(_cfg(blob_dataset, tmp_path / "a", epochs=1, models=["tiny_cnn_a"]))
    b = loop.train(_cfg(blob_dataset, tmp_path / "b", epochs=1, models=["tiny_cnn_a"],
                        mc_variance_weight=5.0))
    wa = load_run(a)[0].members[0].fc.weight
    wb = load_run(b)[0].members[0].fc.weight
    assert not torch.allclose(wa, wb)


def test_empty_class_after_skipping_bad_files(tmp_path):
    from conftest import write_blob_dataset

    data = write_blob_dataset(tmp_path / "d", per_class=4)
    for p in (data / "images" / "normal").glob("*.png"):
        p.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"no usable training images for class\(es\) \['normal'\]"):
        loop.train(_cfg(data, tmp_path / "r"))
    skipped = (tmp_path / "r" / "skipped.jsonl").read_text().splitlines()
    assert len(skipped) == 4


def test_robust_augmentation_trains_reproducibly_and_differs_from_standard(blob_dataset, tmp_path):
    """`--augment robust` (wider crops, blur, JPEG re-compression) runs on the cached uint8 images, is
    saved with the run, is reproducible from the seed, and changes what the model learns."""
    from pixelvote.data.transforms import train_augment
    from pixelvote.errors import ConfigError

    kw = dict(epochs=1, models=["tiny_cnn_a"])
    a = loop.train(_cfg(blob_dataset, tmp_path / "a", augment="robust", **kw))
    b = loop.train(_cfg(blob_dataset, tmp_path / "b", augment="robust", **kw))
    s = loop.train(_cfg(blob_dataset, tmp_path / "s", **kw))
    assert json.loads((a / "train_config.json").read_text())["augment"] == "robust"
    wa, wb, ws = (load_run(r)[0].members[0].fc.weight for r in (a, b, s))
    assert torch.equal(wa, wb)
    assert not torch.allclose(wa, ws)
    with pytest.raises(ConfigError, match="robust"):
        train_augment(32, "robustt")
    with pytest.raises(ValueError):
        _cfg(blob_dataset, tmp_path / "c", augment="heavy")


def test_robust_augmentation_recompresses_and_blurs():
    """Over many draws, the robust pipeline loses more of a sharp pattern's fine detail than the standard
    one (blur and JPEG), while keeping the image's size and type."""
    from pixelvote.data.transforms import train_augment

    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    img = (((yy // 2 + xx // 2) % 2) * 255).to(torch.uint8).expand(3, 64, 64).contiguous()

    def detail(kind: str) -> float:
        torch.manual_seed(0)
        aug = train_augment(64, kind)
        outs = [aug(img) for _ in range(40)]
        assert all(o.dtype == torch.uint8 and o.shape == (3, 64, 64) for o in outs)
        return float(torch.stack([(o.float()[:, :, 1:] - o.float()[:, :, :-1]).abs().mean()
                                  for o in outs]).mean())

    assert detail("robust") < 0.85 * detail("standard")


def test_jpeg_recompression_is_lossy_and_follows_the_seed():
    from pixelvote.data.transforms import JPEGRecompress

    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    torch.manual_seed(1)
    a = JPEGRecompress((30, 40))(img)
    torch.manual_seed(1)
    b = JPEGRecompress((30, 40))(img)
    assert a.shape == img.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert (a.float() - img.float()).abs().mean() > 5  # noise does not survive quality 30-40


def test_train_exclude_keeps_matching_images_out_of_training_only(blob_dataset, tmp_path):
    # "lesion 1", "lesion 10", "lesion 11": a source only the lesion class has
    run = tmp_path / "run"
    prep = loop.prepare_data(_cfg(blob_dataset, run, train_exclude=r"^lesion 1"), run.mkdir() or run)
    plain = loop.prepare_data(_cfg(blob_dataset, tmp_path / "p"), (tmp_path / "p").mkdir() or tmp_path / "p")
    split = json.loads((run / "split.json").read_text())
    names = lambda key: sorted(p.rsplit("/", 1)[1] for p in split[key])  # noqa: E731
    assert split["excluded_from_training"]
    assert all(n.startswith("lesion 1") for n in names("excluded_from_training"))
    assert not any(n.startswith("lesion 1") for n in names("train"))
    plain_split = json.loads((tmp_path / "p" / "split.json").read_text())
    assert split["val"] == plain_split["val"]  # validation is the same split as without the option
    assert len(prep.train) == len(plain.train) - len(split["excluded_from_training"])


def test_calibration_scores_the_kept_out_masks_too_a_few_per_group(blob_dataset, tmp_path):
    def prepared(name, **kw):  # type: ignore[no-untyped-def]
        run = tmp_path / name
        run.mkdir()
        prep = loop.prepare_data(_cfg(blob_dataset, run, train_exclude=r"^lesion 1", **kw), run)
        return prep, json.loads((run / "split.json").read_text())

    names = lambda paths: sorted(Path(p).stem for p in paths)  # noqa: E731
    prep, split = prepared("a")
    val_masked = [p for p in split["val"] if "/lesion/" in p]
    assert prep.masks is not None and split["excluded_from_training"]
    # the validation masks, then those of the images kept out of training
    assert names(split["calibration_masks"]) == names(val_masked + split["excluded_from_training"])
    assert [s.path.stem for s in prep.masks.samples] == [Path(p).stem for p in split["calibration_masks"]]
    assert all(prep.masks.truth(i) is not None for i in range(len(prep.masks)))
    # without: the validation split's own masks, as before (no separate set, the same seeds)
    prep, split = prepared("b", calibrate_excluded=False)
    assert prep.masks is None and names(split["calibration_masks"]) == names(val_masked)
    # one per group ("lesion 1", "lesion 10" and "lesion 11" are one group), kept-out ones included
    prep, split = prepared("c", group_pattern=r"^(\w+ \d)", calibration_per_group=1)
    groups = [n[: len("lesion x")] for n in names(split["calibration_masks"])]
    assert len(groups) == len(set(groups)) and "lesion 1" in groups
    assert prep.masks is not None and len(prep.masks) == len(groups)


def test_calibration_samples_are_evenly_spaced_within_each_group(tmp_path):
    from pixelvote.data.dataset import Sample

    mask = tmp_path / "m.png"
    frames = [Sample(tmp_path / f"Video01_{i:04d}.jpg", "fire", mask, "Video01") for i in range(10)]
    photo = Sample(tmp_path / "photo.jpg", "fire", tmp_path / "m2.png", "photo")
    unmasked = Sample(tmp_path / "Video02_0001.jpg", "fire", None, "Video02")
    cfg = _cfg(tmp_path, tmp_path / "r", group_pattern=r"^(Video\d+)", calibration_per_group=3)
    chosen = loop.calibration_samples(frames[::-1], [photo, unmasked], cfg)
    assert [s.path.stem for s in chosen] == ["Video01_0000", "Video01_0004", "Video01_0009", "photo"]
    every = loop.calibration_samples(frames, [photo], cfg.model_copy(update={"calibration_per_group": 0}))
    assert len(every) == 11
    alone = loop.calibration_samples(frames, [photo], cfg.model_copy(update={"calibrate_excluded": False}))
    assert "photo" not in [s.path.stem for s in alone] and len(alone) == 3


def test_train_exclude_errors_name_the_option(blob_dataset, tmp_path):
    with pytest.raises(DataError, match="--train-exclude"):
        loop.prepare_data(_cfg(blob_dataset, tmp_path / "a", train_exclude="("), tmp_path)
    with pytest.raises(DataError, match="loosen --train-exclude"):
        loop.prepare_data(_cfg(blob_dataset, tmp_path / "b", train_exclude="^lesion"), tmp_path)


def test_a_group_pattern_matching_one_class_only_warns_with_the_fix(blob_dataset, tmp_path, caplog):
    from pixelvote.data.dataset import load_dataset

    samples = load_dataset(blob_dataset).samples
    one_class = _cfg(blob_dataset, tmp_path / "a", group_pattern=r"^(lesion \d)")
    message = loop.warn_one_class_source(samples, one_class)
    assert message is not None and "--train-exclude" in message and "'lesion'" in message
    assert "--train-exclude" in caplog.text
    # a pattern that matches both classes, or none, or an exclusion already set: no warning
    for kw in (dict(group_pattern=r"^(\w+) \d"), dict(group_pattern=r"^(Video\d+)"),
               dict(group_pattern=r"^(lesion \d)", train_exclude="^lesion 1")):
        assert loop.warn_one_class_source(samples, _cfg(blob_dataset, tmp_path / "x", **kw)) is None
