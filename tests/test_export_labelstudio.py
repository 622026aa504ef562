"""Label Studio export: brush RLE codec, tasks, labelling config, and the import back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from test_export_fixtures import BACKGROUND, CLASSES, EXPECTED, make_out, read_png

from pixelvote.errors import DataError
from pixelvote.export import export_annotations, import_annotations
from pixelvote.export.labelstudio import config_path
from pixelvote.export.lsbrush import decode_rle, encode_rle, mask2rle, rle2mask


def _sdk_brush():
    """label_studio_sdk.converter.brush, loaded alone (the SDK package imports far more)."""
    spec = importlib.util.find_spec("label_studio_sdk")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("label-studio-sdk is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "converter" / "brush.py"
    mod_spec = importlib.util.spec_from_file_location("_ls_brush", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_rle_bytes_are_hand_computed():
    # 1 pixel of 255 -> 4 values: num=4 (32 bits), word 8 (00111), sizes 3,4,8,16 (0010 0011 0111 1111),
    # one run block "1" "00" "011" (length 4) "11111111", then zero padding to whole bytes.
    assert mask2rle(np.array([[True]])) == [0, 0, 0, 4, 57, 27, 252, 127, 224]
    assert mask2rle(np.array([[0, 255]], np.uint8)) == [0, 0, 0, 8, 57, 27, 252, 96, 17, 255, 128]
    assert encode_rle(np.array([7, 3, 3])) == [0, 0, 0, 3, 57, 27, 248, 0, 240, 129, 128]
    np.testing.assert_array_equal(decode_rle([0, 0, 0, 3, 57, 27, 248, 0, 240, 129, 128]), [7, 3, 3])


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (23, 37), (300, 250)])
def test_codec_round_trip_including_runs_longer_than_65536(shape):
    rng = np.random.default_rng(sum(shape))
    masks = [rng.random(shape) > 0.5, np.zeros(shape, bool), np.ones(shape, bool)]
    for m in masks:
        rle = mask2rle(m)
        assert all(0 <= b <= 255 for b in rle)
        np.testing.assert_array_equal(rle2mask(rle, shape[1], shape[0]), m)


def test_decoder_reads_other_word_and_run_sizes():
    # word size 4 and a literal block, as thi.ng/rle-pack may write: num=3, ws-1=3, sizes 1,2,3,4;
    # block: literal(0) idx 01 (2 bits) len-1=2 -> 3 literals 5, 6, 7
    bits = (
        f"{3:032b}"
        + "00011"
        + "0000"
        + "0001"
        + "0010"
        + "0011"
        + "0"
        + "01"
        + "10"
        + "0101"
        + "0110"
        + "0111"
    )
    bits += "0" * (-len(bits) % 8)
    data = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    np.testing.assert_array_equal(decode_rle(data), [5, 6, 7])
    with pytest.raises(ValueError, match="ends early"):
        decode_rle(data[:6])
    with pytest.raises(ValueError, match="expected 2x2x4"):
        rle2mask(mask2rle(np.ones((3, 3), bool)), 2, 2)


def test_codec_matches_label_studio_sdk():
    brush = _sdk_brush()
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 3), (40, 61), (260, 300)]:
        for m in (rng.random(shape) > 0.7, np.ones(shape, bool), np.zeros(shape, bool)):
            u8 = (m * 255).astype(np.uint8)
            assert mask2rle(m) == brush.mask2rle(u8)
            sdk = brush.decode_rle(brush.mask2rle(u8)).reshape(shape[0], shape[1], 4)[:, :, 3]
            np.testing.assert_array_equal(rle2mask(brush.mask2rle(u8), shape[1], shape[0]), sdk > 0)


def _export(tmp_path):
    out = make_out(tmp_path)
    path = export_annotations(out, "labelstudio", tmp_path / "ls" / "tasks.json")
    return out, path, json.loads(path.read_text())


def test_tasks_have_scored_brush_predictions_flagged_first(tmp_path):
    out, path, tasks = _export(tmp_path)
    keys = [t["data"]["pixelvote_key"] for t in tasks]
    assert keys == ["scan one", "empty flagged", "full", "a/scan 01", "lesion", "b/scan 01", "bg"]
    assert [t["data"]["flagged"] for t in tasks] == [True, True] + [False] * 5
    for task in tasks:
        key = task["data"]["pixelvote_key"]
        label, mask = EXPECTED[key]
        (pred,) = task["predictions"]
        assert pred["score"] == task["data"]["confidence"]
        assert pred["model_version"] == "pixelvote:demo"
        brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
        choices = [r for r in pred["result"] if r["type"] == "choices"]
        assert choices[0]["value"]["choices"] == [label]
        if not mask.any():
            assert brushes == []
            continue
        (res,) = brushes
        assert (res["original_width"], res["original_height"]) == (mask.shape[1], mask.shape[0])
        assert res["image_rotation"] == 0
        assert res["value"]["format"] == "rle" and res["value"]["brushlabels"] == [label]
        np.testing.assert_array_equal(rle2mask(res["value"]["rle"], mask.shape[1], mask.shape[0]), mask)
    scan = tasks[keys.index("a/scan 01")]["data"]["image"]
    assert scan.startswith("/data/local-files/?d=") and unquote(scan.split("?d=")[1]) == "a/scan 01.png"
    assert tasks[0]["data"]["reasons"] == "disagreement, low_confidence"


def test_config_matches_the_results(tmp_path):
    _, path, tasks = _export(tmp_path)
    cfg = config_path(path)
    assert cfg.name == "tasks_config.xml"
    text = cfg.read_text()
    root = ET.fromstring(text)
    assert root.tag == "View"
    image = root.find("Image")
    brush = root.find("BrushLabels")
    choices = root.find("Choices")
    assert image.get("value") == "$image"
    assert [lab.get("value") for lab in brush.findall("Label")] == ["benign", "malignant"]
    assert [c.get("value") for c in choices.findall("Choice")] == CLASSES
    for task in tasks:
        for res in task["predictions"][0]["result"]:
            assert res["to_name"] == image.get("name")
            assert res["from_name"] == (brush if res["type"] == "brushlabels" else choices).get("name")
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={tmp_path / 'images'}" in text


def test_image_url_prefix(tmp_path):
    path = export_annotations(
        make_out(tmp_path), "labelstudio", tmp_path / "t.json", image_url_prefix="https://h/img/"
    )
    urls = {t["data"]["pixelvote_key"]: t["data"]["image"] for t in json.loads(path.read_text())}
    assert urls["a/scan 01"] == "https://h/img/a/scan%2001.png"


def _as_label_studio_export(tasks):
    """What Label Studio's JSON export gives after a reviewer submits each prediction unchanged."""
    exported = []
    for i, task in enumerate(tasks, start=1):
        pred = task["predictions"][0]
        exported.append(
            {
                "id": i,
                "data": task["data"],
                "annotations": [
                    {
                        "id": 100 + i,
                        "result": json.loads(json.dumps(pred["result"])),
                        "was_cancelled": False,
                        "completed_by": {"id": 1, "email": "rev@example.org"},
                        "created_at": "2025-01-02T10:00:00.000000Z",
                        "updated_at": "2025-01-02T10:00:00.000000Z",
                    }
                ],
                "predictions": [pred],
            }
        )
    return exported


def _records(folder):
    return {r["key"]: r for r in map(json.loads, (folder / "annotations.jsonl").read_text().splitlines())}


def test_import_round_trip_is_bit_exact(tmp_path):
    _, _, tasks = _export(tmp_path)
    src = tmp_path / "export.json"
    src.write_text(json.dumps(_as_label_studio_export(tasks)))
    back = import_annotations("labelstudio", src, tmp_path / "back")
    meta = json.loads((back / "annotate.json").read_text())
    assert meta["classes"] == CLASSES and meta["background"] == BACKGROUND
    records = _records(back)
    assert set(records) == set(EXPECTED)
    for key, (label, mask) in EXPECTED.items():
        rec = records[key]
        np.testing.assert_array_equal(read_png(back / rec["mask"]) > 0, mask)
        assert rec["label"] == label
        assert (rec["width"], rec["height"]) == (mask.shape[1], mask.shape[0])
        assert rec["reviewed"] is True and rec["source"] == "labelstudio"
        assert rec["reviewer"] == "rev@example.org"
    assert records["scan one"]["model"] == {"label": "malignant", "probability": 0.55, "flagged": True}


def test_import_uses_corrections_and_skips_unreviewed(tmp_path):
    _, _, tasks = _export(tmp_path)
    exported = _as_label_studio_export(tasks)
    by_key = {t["data"]["pixelvote_key"]: t for t in exported}
    # the reviewer says "lesion" is normal tissue: the brush region left over is dropped
    by_key["lesion"]["annotations"][0]["result"][-1]["value"]["choices"] = ["normal"]
    # "full": a newer annotation erases the region and drops the choice -> background
    newer = {
        **by_key["full"]["annotations"][0],
        "id": 999,
        "result": [],
        "updated_at": "2025-02-01T00:00:00Z",
    }
    by_key["full"]["annotations"].insert(0, newer)
    # "bg": only a cancelled annotation -> not reviewed
    by_key["bg"]["annotations"][0]["was_cancelled"] = True
    # "a/scan 01": no annotation at all
    by_key["a/scan 01"]["annotations"] = []
    src = tmp_path / "export.json"
    src.write_text(json.dumps(exported))
    records = _records(import_annotations("labelstudio", src, tmp_path / "back"))
    assert set(records) == set(EXPECTED) - {"bg", "a/scan 01"}
    assert records["lesion"]["label"] == "normal" and records["lesion"]["mask_area"] == 0
    assert records["full"]["label"] == "normal" and records["full"]["mask_area"] == 0
    assert records["b/scan 01"]["mask_area"] == int(EXPECTED["b/scan 01"][1].sum())


def test_import_errors(tmp_path):
    _, _, tasks = _export(tmp_path)
    exported = _as_label_studio_export(tasks)
    for t in exported:
        t["annotations"] = []
    src = tmp_path / "none.json"
    src.write_text(json.dumps(exported))
    with pytest.raises(DataError, match="no reviewed image"):
        import_annotations("labelstudio", src, tmp_path / "o1")
    (tmp_path / "x.json").write_text(json.dumps({"not": "tasks"}))
    with pytest.raises(DataError, match="list of tasks"):
        import_annotations("labelstudio", tmp_path / "x.json", tmp_path / "o2")
    exported = _as_label_studio_export(tasks)
    res = next(r for r in exported[0]["annotations"][0]["result"] if r["type"] == "brushlabels")
    res["value"]["rle"] = res["value"]["rle"][:5]
    (tmp_path / "y.json").write_text(json.dumps(exported))
    with pytest.raises(DataError, match="bad brush RLE") as err:
        import_annotations("labelstudio", tmp_path / "y.json", tmp_path / "o3")
    assert err.value.path == str(tmp_path / "y.json")
