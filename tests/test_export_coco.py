"""COCO instances / results export, checked with pycocotools itself, and the COCO import."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from test_export_fixtures import BACKGROUND, CLASSES, EXPECTED, make_out, read_png

from pixelvote.errors import ConfigError, DataError
from pixelvote.export import export_annotations, import_annotations
from pixelvote.export.coco import decode, encode

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

# pycocotools' decode trips a numpy 2 deprecation warning inside the library itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_encode_is_column_major_rle_with_ascii_counts():
    m = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    rle = encode(m)
    assert rle["size"] == [2, 3] and isinstance(rle["counts"], str)
    # column-major runs: 0 0 | 1 1 | 1 0 -> bg 2, fg 3, bg 1
    from pycocotools import mask as mask_utils

    assert (
        mask_utils.frPyObjects({"size": [2, 3], "counts": [2, 3, 1]}, 2, 3)["counts"].decode()
        == rle["counts"]
    )
    np.testing.assert_array_equal(decode(rle), m)


def test_coco_file_loads_in_pycocotools_and_decodes_to_the_masks(tmp_path):
    out = make_out(tmp_path)
    path = export_annotations(out, "coco", tmp_path / "coco.json")
    coco = _quiet(COCO, str(path))
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert cats == {1: "benign", 2: "malignant"}
    images = {im["pixelvote_key"]: im for im in coco.dataset["images"]}
    assert set(images) == set(EXPECTED)
    assert [im["id"] for im in coco.dataset["images"]] == list(range(1, len(EXPECTED) + 1))
    assert images["a/scan 01"]["file_name"] == "a/scan 01.png"
    assert images["lesion"]["file_name"] == "benign/lesion.png"
    for key, (label, mask) in EXPECTED.items():
        im = images[key]
        assert (im["width"], im["height"]) == (mask.shape[1], mask.shape[0])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        if not mask.any():
            assert anns == []
            continue
        (ann,) = anns
        assert cats[ann["category_id"]] == label
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["area"] == int(mask.sum())
        assert ann["iscrowd"] == 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[images["scan one"]["id"]]))[0]
    assert ann["score"] == pytest.approx(0.55)
    assert ann["attributes"] == {
        "uncertainty": 0.25,
        "agreement": 0.5,
        "flagged": True,
        "reasons": ["disagreement", "low_confidence"],
    }
    assert images["empty flagged"]["pixelvote"]["reasons"] == ["empty_mask"]
    assert coco.dataset["info"]["pixelvote"] == {"classes": CLASSES, "background": BACKGROUND}


def test_lesion_bbox_is_hand_computed(tmp_path):
    coco = json.loads(export_annotations(make_out(tmp_path), "coco", tmp_path / "c.json").read_text())
    image_id = next(im["id"] for im in coco["images"] if im["pixelvote_key"] == "lesion")
    ann = next(a for a in coco["annotations"] if a["image_id"] == image_id)
    assert ann["bbox"] == [8.0, 5.0, 22.0, 10.0]
    assert ann["area"] == 10 * 22 - 2 * 8


def test_results_evaluate_perfectly_against_the_same_masks(tmp_path):
    out = make_out(tmp_path)
    gt_path = export_annotations(out, "coco", tmp_path / "gt.json")
    res_path = export_annotations(out, "coco-results", tmp_path / "res.json")
    results = json.loads(res_path.read_text())
    assert len(results) == 5 and set(results[0]) == {"image_id", "category_id", "segmentation", "score"}
    gt = _quiet(COCO, str(gt_path))
    dt = _quiet(gt.loadRes, str(res_path))
    ev = COCOeval(gt, dt, "segm")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    assert ev.stats[0] == pytest.approx(1.0)


def test_results_follow_a_ground_truth_numbering(tmp_path):
    out = make_out(tmp_path)
    gt = {
        "images": [
            {"id": 70, "file_name": "benign/lesion.png", "width": 37, "height": 23},
            {"id": 71, "file_name": "b/scan 01.png", "width": 19, "height": 17},
        ],
        "categories": [{"id": 5, "name": "malignant"}, {"id": 9, "name": "benign"}],
        "annotations": [],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    res = export_annotations(out, "coco-results", tmp_path / "r.json", coco_gt=tmp_path / "gt.json")
    got = sorted((r["image_id"], r["category_id"]) for r in json.loads(res.read_text()))
    assert got == [(70, 9), (71, 5)]


def test_import_coco_round_trip_is_bit_exact(tmp_path):
    out = make_out(tmp_path)
    path = export_annotations(out, "coco", tmp_path / "coco.json")
    back = import_annotations("coco", path, tmp_path / "back")
    meta = json.loads((back / "annotate.json").read_text())
    assert meta["classes"] == CLASSES and meta["background"] == BACKGROUND
    records = {r["key"]: r for r in map(json.loads, (back / "annotations.jsonl").read_text().splitlines())}
    assert set(records) == set(EXPECTED)
    for key, (label, mask) in EXPECTED.items():
        rec = records[key]
        got = read_png(back / rec["mask"])
        assert set(np.unique(got)) <= {0, 255}
        np.testing.assert_array_equal(got > 0, mask)
        assert rec["label"] == (label if mask.any() else BACKGROUND)
        assert rec["reviewed"] is True and rec["source"] == "coco"
        assert rec["mask_area"] == int(mask.sum())
        assert rec["label_index"] == CLASSES.index(rec["label"])
        assert rec["image"].endswith(".png")
    assert records["empty flagged"]["model"]["label"] == "benign"
    with pytest.raises(ConfigError, match="already holds annotation records"):
        import_annotations("coco", path, back)


def test_import_foreign_coco_with_polygons_and_uncompressed_rle(tmp_path):
    coco = {
        "images": [
            {"id": 1, "file_name": "x/one.jpg", "width": 6, "height": 5},
            {"id": 2, "file_name": "two.jpg", "width": 4, "height": 3},
            {"id": 3, "file_name": "three.jpg", "width": 4, "height": 3},
        ],
        "categories": [{"id": 3, "name": "tumour"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 3,
                "iscrowd": 1,
                "segmentation": {"size": [3, 4], "counts": [1, 2, 9]},
            },
        ],
    }
    src = tmp_path / "foreign.json"
    src.write_text(json.dumps(coco))
    back = import_annotations("coco", src, tmp_path / "o", background="healthy")
    meta = json.loads((back / "annotate.json").read_text())
    assert meta["classes"] == ["tumour", "healthy"] and meta["background"] == "healthy"
    recs = {r["key"]: r for r in map(json.loads, (back / "annotations.jsonl").read_text().splitlines())}
    assert [recs[k]["label"] for k in ("one", "two", "three")] == ["tumour", "tumour", "healthy"]
    two = read_png(back / "masks" / "two.png") > 0
    np.testing.assert_array_equal(
        two, np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    )  # column-major
    one = read_png(back / "masks" / "one.png") > 0
    assert one[2, 2] and not one[0, 0] and one.shape == (5, 6)


def test_import_coco_bad_files(tmp_path):
    with pytest.raises(DataError, match="COCO file is missing"):
        import_annotations("coco", tmp_path / "none.json", tmp_path / "o")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        import_annotations("coco", tmp_path / "bad.json", tmp_path / "o")
    (tmp_path / "wrong.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="missing 'categories'"):
        import_annotations("coco", tmp_path / "wrong.json", tmp_path / "o")
    coco = {
        "images": [
            {"id": 1, "file_name": "../../evil.png", "width": 2, "height": 2, "pixelvote_key": "../evil"}
        ],
        "categories": [],
        "annotations": [],
    }
    (tmp_path / "evil.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="relative path without"):
        import_annotations("coco", tmp_path / "evil.json", tmp_path / "o")


def test_an_imported_folder_exports_again(tmp_path):
    out = make_out(tmp_path)
    back = import_annotations("coco", export_annotations(out, "coco", tmp_path / "a.json"), tmp_path / "b")
    again = json.loads(export_annotations(back, "coco", tmp_path / "c.json").read_text())
    coco = _quiet(COCO, str(tmp_path / "c.json"))
    for im in again["images"]:
        mask = EXPECTED[im["pixelvote_key"]][1]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        got = coco.annToMask(anns[0]).astype(bool) if anns else np.zeros_like(mask)
        np.testing.assert_array_equal(got, mask)
    assert all(a["score"] is None for a in again["annotations"])
