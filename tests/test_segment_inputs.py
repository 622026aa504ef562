"""`segment train` on inputs it cannot fully use: an --out that holds a segmenter, masks or images that are
missing, corrupt or of the wrong size, records without an image path (a plain COCO import)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pixelvote import cli
from pixelvote.errors import CheckpointError, ConfigError, DataError
from pixelvote.segment.data import select_examples
from pixelvote.segment.train import SegConfig, load_segmenter, skipped_inputs, train_segmenter
from tests.test_segment import _out

CFG = SegConfig(epochs=1, image_size=64, batch_size=4, crf=False, encoder_init="imagenet")


def _train(annotations, seg, mode="confident"):  # type: ignore[no-untyped-def]
    return train_segmenter(annotations, seg, cfg=CFG.model_copy(update={"mode": mode}), pretrained=False,
                           device="cpu", calibrate=False)


def _records(out):  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]


def _write_records(out, recs) -> None:  # type: ignore[no-untyped-def]
    (out / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_an_out_that_holds_a_segmenter_is_refused_not_overwritten(tmp_path, monkeypatch, capsys):
    out = _out(tmp_path)
    seg = _train(out, tmp_path / "seg")
    before = {f: (seg / f).read_bytes() for f in ("segmenter.safetensors", "segmenter.json", "history.json")}
    with pytest.raises(CheckpointError, match="a segmenter already exists here") as err:
        _train(out, seg)
    assert err.value.path == str(seg) and "choose another --out" in err.value.fix
    assert {f: (seg / f).read_bytes() for f in before} == before
    # a file as --out: a clear error before any training
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out is a file"):
        _train(out, tmp_path / "file")
    # through the CLI: exit code 2 and one message naming the folder and the fix
    monkeypatch.setattr(sys, "argv", ["pixelvote", "segment", "train", "--annotations", str(out), "--out",
                                      str(seg), "--epochs", "1", "--image-size", "64", "--no-pretrained"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    msg = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in msg
    assert f"{seg}: a segmenter already exists here" in msg and "choose another --out" in msg
    assert {f: (seg / f).read_bytes() for f in before} == before


def test_segment_combine_refuses_an_out_that_holds_a_segmenter(tmp_path):
    from pixelvote.segment.combine import combine_segmenters

    out = _out(tmp_path)
    a, b = _train(out, tmp_path / "a"), _train(out, tmp_path / "b")
    target = _train(out, tmp_path / "c")
    before = (target / "segmenter.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="a segmenter already exists here"):
        combine_segmenters([a, b], target)
    assert (target / "segmenter.safetensors").read_bytes() == before
    assert json.loads((target / "segmenter.json").read_text())["members"] == []


def _broken_folder(tmp_path):  # type: ignore[no-untyped-def]
    """An annotation folder of 9 records (lesions: 1, 2, 4, 5, 7, 8) whose mask 1 is gone, mask 2 is not
    an image, mask 4 has another size than its image and mask 5 is truncated (its header reads)."""
    out = _out(tmp_path, n=9)
    (out / "masks" / "1.png").unlink()
    (out / "masks" / "2.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(out / "masks" / "4.png")
    m = np.zeros((40, 50), np.uint8)
    m[5:30, 5:40] = np.random.default_rng(1).integers(0, 255, (25, 35))  # noise: a long compressed stream
    Image.fromarray(m).save(out / "masks" / "5.png")
    data = (out / "masks" / "5.png").read_bytes()
    (out / "masks" / "5.png").write_bytes(data[: len(data) // 2])
    return out


def test_unusable_masks_are_skipped_with_their_reason(tmp_path):
    out = _broken_folder(tmp_path)
    skipped: list[dict] = []
    examples = select_examples(out, background="normal", mode="all", skipped=skipped)
    assert sorted(e.image.stem for e in examples) == ["0", "3", "6", "7", "8"]
    assert [e.mask is None for e in sorted(examples, key=lambda e: e.image.stem)] == [True, True, True,
                                                                                       False, False]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert sorted(reasons) == ["1", "2", "4", "5"]
    assert all(s["image"] == str(out / "img" / f"{s['key']}.png") for s in skipped)
    assert reasons["1"].startswith(f"{out / 'masks' / '1.png'}: mask of {out / 'img' / '1.png'} not found")
    assert "not a readable image" in reasons["2"]
    assert "mask is 30x20 but its image is 50x40" in reasons["4"]
    assert "could not be decoded" in reasons["5"]
    assert all("Fix: restore the mask" in r for r in reasons.values())
    # without a list to fill they are still left out
    assert len(select_examples(out, background="normal", mode="all")) == 5


def test_training_goes_on_without_the_unusable_records_and_lists_them(tmp_path):
    out = _broken_folder(tmp_path)
    (out / "img" / "7.png").unlink()  # an image gone too
    seg = _train(out, tmp_path / "seg", mode="all")  # (segment train --all)
    assert json.loads((seg / "segmenter.json").read_text())["examples"] == 4
    assert len(json.loads((seg / "history.json").read_text())) == 1
    load_segmenter(seg, device="cpu")
    listed = [json.loads(line) for line in (seg / "skipped.jsonl").read_text().splitlines()]
    assert [s["key"] for s in listed] == ["1", "2", "4", "5", "7"]
    assert listed[-1]["reason"].startswith(f"{out / 'img' / '7.png'}: image not found")
    assert skipped_inputs(seg) == listed
    clean = _train(_out(tmp_path / "clean"), tmp_path / "seg-clean")
    assert skipped_inputs(clean) == [] and not (clean / "skipped.jsonl").exists()


def test_members_list_what_they_were_trained_without_in_the_combination(tmp_path):
    from pixelvote.segment.combine import train_combined

    out = _broken_folder(tmp_path)
    combined = train_combined(out, tmp_path / "segs", 2, cfg=CFG.model_copy(update={"mode": "all"}),
                              pretrained=False, device="cpu")
    assert [s["key"] for s in skipped_inputs(combined)] == ["1", "2", "4", "5"]
    assert skipped_inputs(combined) == skipped_inputs(combined / "member-0")


def test_nothing_usable_is_a_clear_error_naming_the_first_problem(tmp_path):
    out = _out(tmp_path)
    for f in (out / "img").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"none of the 5 record\(s\) for mode 'confident' can be used") as err:
        _train(out, tmp_path / "seg")
    assert "image not found" in err.value.problem and err.value.path == str(out / "annotations.jsonl")
    assert not (tmp_path / "seg").exists()


def test_records_without_an_image_path_are_skipped_and_the_fix_says_how_to_import(tmp_path):
    out = _out(tmp_path)
    recs = _records(out)
    recs[1]["image"] = None
    del recs[2]["image"]
    _write_records(out, recs)
    skipped: list[dict] = []
    examples = select_examples(out, background="normal", mode="all", skipped=skipped)
    assert len(examples) == 4 and [s["key"] for s in skipped] == ["1", "2"]
    assert skipped[0]["image"] is None
    assert skipped[0]["reason"].startswith(f"{out / 'annotations.jsonl'}: record '1': no image path")
    assert "pixelvote_image" in skipped[0]["reason"] and "new --to folder" in skipped[0]["reason"]


def test_a_plain_coco_import_is_a_clear_error_not_a_type_error(tmp_path):
    from pixelvote.export import import_annotations

    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 50, "height": 40} for i in (1, 2, 3)],
            "categories": [{"id": 1, "name": "lesion"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[10, 10, 30, 10, 30, 25, 10, 25]]} for i in (1, 2)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ann = import_annotations("coco", tmp_path / "coco.json", tmp_path / "ann")
    assert all(r["image"] is None for r in _records(ann))
    with pytest.raises(DataError, match=r"none of the 3 record\(s\) has an image path") as err:
        _train(ann, tmp_path / "seg")
    assert "pixelvote_image" in err.value.fix and "--to" in err.value.fix
    assert err.value.path == str(ann / "annotations.jsonl")


def test_improve_trains_into_its_own_folders_and_resumes_without_the_guard_refusing(tmp_path, monkeypatch):
    import pixelvote.engine.annotate as annotate_mod
    import pixelvote.models.checkpoint as checkpoint
    import pixelvote.segment.train as seg_train
    from pixelvote.segment.improve import improve

    source = _out(tmp_path / "source")
    annotated, trained = [], []

    def fake_annotate(run, images, out, **kw):  # type: ignore[no-untyped-def]
        import shutil

        annotated.append(out.parent.name)
        shutil.copytree(source, out)

    real = seg_train.train_segmenter

    def fake_train(annotations, folder, **kw):  # type: ignore[no-untyped-def]
        trained.append(folder.parent.name)
        return real(annotations, folder, cfg=kw["cfg"].model_copy(update={"crf": False,
                                                                          "encoder_init": "imagenet"}),
                    pretrained=False, device="cpu", calibrate=False)

    monkeypatch.setattr(annotate_mod, "annotate", fake_annotate)
    monkeypatch.setattr(checkpoint, "read_run_config",
                        lambda run: SimpleNamespace(image_size=64, background="normal"))
    monkeypatch.setattr(seg_train, "train_segmenter", fake_train)
    work = tmp_path / "work"
    log = improve(tmp_path / "run", tmp_path / "images", work, rounds=1, seg_epochs=1, device="cpu")
    assert [e["masks_from"] for e in log] == ["consensus", "segmenter"]
    assert annotated == ["round0", "round1"] and trained == ["round0"]
    seg = work / "round0" / "segmenter"
    assert json.loads((seg / "segmenter.json").read_text())["examples"] == 5
    # run again: everything is there, nothing is annotated or trained again (and nothing refused)
    assert len(improve(tmp_path / "run", tmp_path / "images", work, rounds=1, seg_epochs=1,
                       device="cpu")) == 2
    assert annotated == ["round0", "round1"] and trained == ["round0"]
    # interrupted while saving the segmenter (weights, no segmenter.json): trained again over it
    (seg / "segmenter.json").unlink()
    improve(tmp_path / "run", tmp_path / "images", work, rounds=1, seg_epochs=1, device="cpu")
    assert trained == ["round0", "round0"] and (seg / "segmenter.json").exists()


def test_the_cli_exits_3_when_it_trained_without_some_records(tmp_path, monkeypatch, capsys):
    out = _broken_folder(tmp_path)
    seg = tmp_path / "seg"
    monkeypatch.setattr(sys, "argv", ["pixelvote", "segment", "train", "--annotations", str(out), "--out",
                                      str(seg), "--all", "--epochs", "1", "--image-size", "64",
                                      "--no-pretrained", "--no-calibrate", "--no-crf"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    msg = capsys.readouterr().err
    assert exc.value.code == 3
    assert f"4 input(s) were skipped; they are listed in {seg / 'skipped.jsonl'}" in msg
    assert (seg / "segmenter.json").exists()
