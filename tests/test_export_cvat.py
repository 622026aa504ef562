"""CVAT for images 1.1 export: mask RLE inside the box crop, XML structure, zip layout."""

from __future__ import annotations

import json
import zipfile
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from test_export_fixtures import CLASSES, EXPECTED, make_out

from pixelvote.export import export_annotations
from pixelvote.export.cvat import decode_mask, encode_mask, labels_path, read_cvat


def _reference_runs(mask):
    """Independent, loop-based CVAT encoding: row-major in the box, first run is background."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    runs, current, n = [], False, 0
    for v in crop.ravel().tolist():
        if v == current:
            n += 1
        else:
            runs.append(n)
            current, n = v, 1
    runs.append(n)
    return runs, int(xs.min()), int(ys.min()), crop.shape[1], crop.shape[0]


def test_encode_hand_computed():
    m = np.zeros((4, 5), bool)
    m[1, 1:3] = True
    m[2, 3] = True
    # box x 1..3, y 1..2 (3x2): rows "110" "001" -> runs bg 0, fg 2, bg 3, fg 1
    assert encode_mask(m) == ([0, 2, 3, 1], 1, 1, 3, 2)
    assert encode_mask(np.zeros((3, 3), bool)) is None
    np.testing.assert_array_equal(decode_mask([0, 2, 3, 1], 1, 1, 3, 2, 5, 4), m)


def test_encode_matches_reference_and_round_trips():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (5, 7), (31, 50)]:
        for m in (rng.random(shape) > 0.6, np.ones(shape, bool)):
            if not m.any():
                continue
            enc = encode_mask(m)
            assert enc == _reference_runs(m)
            np.testing.assert_array_equal(decode_mask(*enc, shape[1], shape[0]), m)
    with pytest.raises(ValueError, match="runs cover"):
        decode_mask([1, 2], 0, 0, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        decode_mask([4], 3, 0, 2, 2, 4, 4)


def test_xml_structure_and_masks(tmp_path):
    out = make_out(tmp_path)
    path = export_annotations(out, "cvat", tmp_path / "cvat" / "annotations.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task.findtext("mode") == "annotation" and task.findtext("size") == str(len(EXPECTED))
    assert [lab.findtext("name") for lab in task.findall("labels/label")] == CLASSES
    attrs = [a.findtext("name") for a in task.findall("labels/label")[0].findall("attributes/attribute")]
    assert attrs == ["flagged", "confidence", "reasons"]
    images = root.findall("image")
    names = [im.get("name") for im in images]
    assert names == sorted(names) and [im.get("id") for im in images] == [str(i) for i in range(len(images))]
    assert "a/scan 01.png" in names and "malignant/scan one.png" in names
    key_of = {"a/scan 01.png": "a/scan 01", "b/scan 01.png": "b/scan 01"}
    for im in images:
        key = key_of.get(im.get("name"), im.get("name").split("/")[-1][:-4])
        label, mask = EXPECTED[key]
        assert (int(im.get("width")), int(im.get("height"))) == (mask.shape[1], mask.shape[0])
        masks = im.findall("mask")
        (tag,) = im.findall("tag")
        assert tag.get("label") == label
        if not mask.any():
            assert masks == []
            continue
        (m,) = masks
        assert m.get("label") == label and m.get("source") == "auto"
        runs = [int(v) for v in m.get("rle").split(", ")]
        assert (runs, *(int(m.get(k)) for k in ("left", "top", "width", "height"))) == _reference_runs(mask)
    scan = next(im for im in images if im.get("name") == "malignant/scan one.png")
    tag_attrs = {a.get("name"): a.text for a in scan.find("tag").findall("attribute")}
    assert tag_attrs == {"flagged": "true", "confidence": "0.5500", "reasons": "disagreement,low_confidence"}
    # the "scan one" box starts on a foreground pixel, so its RLE starts with an empty background run
    assert scan.find("mask").get("rle").startswith("0, ")
    decoded = read_cvat(path)
    for name, item in decoded.items():
        key = key_of.get(name, name.split("/")[-1][:-4])
        np.testing.assert_array_equal(item["mask"], EXPECTED[key][1])
    spec = json.loads(labels_path(path).read_text())
    assert [s["name"] for s in spec] == CLASSES and spec[0]["type"] == "any"


def test_zip_holds_annotations_xml(tmp_path):
    out = make_out(tmp_path)
    path = export_annotations(out, "cvat", tmp_path / "cvat.zip")
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["annotations.xml"]
    assert labels_path(path).name == "cvat_labels.json"
    decoded = read_cvat(path)
    np.testing.assert_array_equal(decoded["benign/lesion.png"]["mask"], EXPECTED["lesion"][1])
