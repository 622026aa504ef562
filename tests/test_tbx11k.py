"""TBX11K reader: the real TB subset (read only) and tiny synthetic roots written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelvote.data import tbx11k
from pixelvote.errors import ConfigError, DataError
from pixelvote.evaluate.metrics import mask_to_box

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tbx11k_tb"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="shared TBX11K subset not present")

XML = """<annotation><filename>{name}</filename>{size}{objects}</annotation>"""
SIZE = "<size><width>{w}</width><height>{h}</height><depth>1</depth></size>"
OBJ = (
    "<object><name>{cls}</name><difficult>0</difficult>"
    "<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
)


def _xml(
    path: Path, name: str, size: tuple[int, int] | None, boxes: list[tuple[str, int, int, int, int]]
) -> Path:
    objects = "".join(OBJ.format(cls=c, x0=a, y0=b, x1=x, y1=y) for c, a, b, x, y in boxes)
    text = XML.format(
        name=name, size="" if size is None else SIZE.format(w=size[0], h=size[1]), objects=objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _png(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w), dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """imgs/{tb,health,sick,test}; one TB image with an XML in original-scan pixels."""
    r = tmp_path / "TBX11K"
    _png(r / "imgs" / "tb" / "tb0001.png", 100, 50)
    _png(r / "imgs" / "health" / "h0001.png", 100, 50)
    _png(r / "imgs" / "sick" / "s0001.png", 64, 64)
    _png(r / "imgs" / "test" / "t0001.png", 64, 64)
    # original scan 1000x500 (10x the PNG); VOC pixels 11..200 x 21..100 -> edges [10, 200) x [20, 100)
    _xml(
        r / "annotations" / "xml" / "tb0001.xml",
        "tb0001",
        (1000, 500),
        [("ActiveTuberculosis", 11, 21, 200, 100)],
    )
    return r


def test_detect_root(root: Path, tmp_path: Path) -> None:
    assert tbx11k.is_tbx11k_root(root)
    assert not tbx11k.is_tbx11k_root(tmp_path)
    assert tbx11k.find_tbx11k_root(root / "imgs" / "tb") == root
    assert tbx11k.find_tbx11k_root(tmp_path) == root  # one level below
    assert tbx11k.find_tbx11k_root(tmp_path / "nowhere") is None


def test_list_samples_rescales_voc_boxes(root: Path) -> None:
    samples = tbx11k.list_samples(root)
    assert [s.key for s in samples] == ["health/h0001.png", "sick/s0001.png", "tb/tb0001.png"]  # no test/
    assert [s.tb for s in samples] == [False, False, True]
    tb = samples[-1]
    assert tb.size == (50, 100)
    assert tb.box_classes == ("ActiveTuberculosis",)
    assert tb.boxes[0] == pytest.approx((1.0, 2.0, 20.0, 10.0))
    mask = tbx11k.sample_mask(tb)
    assert mask.shape == (50, 100) and mask_to_box(mask) == (1, 2, 20, 10)
    assert not tbx11k.sample_mask(samples[0]).any()


def test_mapping_box_classes_and_folders(root: Path) -> None:
    active_none = tbx11k.TBMapping(tb_box_classes=frozenset({"ObsoletePulmonaryTuberculosis"}))
    tb = tbx11k.list_samples(root, folders=["tb"])[0]
    assert not tbx11k.sample_mask(tb, active_none).any()
    assert tbx11k.TBMapping().is_tb_folder("Sick-TB") and not tbx11k.TBMapping().is_tb_folder("Healthy")
    with pytest.raises(ConfigError, match="Did you mean 'tb'"):
        tbx11k.TBMapping().is_tb_folder("tbb")
    (root / "imgs" / "mystery").mkdir()
    with pytest.raises(ConfigError, match="'mystery' is neither a TB nor a non-TB class"):
        tbx11k.list_samples(root)
    custom = tbx11k.TBMapping(non_tb_folders=frozenset({"health", "sick", "mystery"}))
    assert len(tbx11k.list_samples(root, mapping=custom)) == 3
    with pytest.raises(ConfigError, match="no image folder 'tbs'"):
        tbx11k.list_samples(root, folders=["tbs"])


def test_coco_json_used_when_no_xml(root: Path) -> None:
    (root / "annotations" / "xml" / "tb0001.xml").unlink()
    coco = {
        "images": [
            {"id": 1, "file_name": "tb/tb0001.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "health/h0001.png", "width": 100, "height": 50},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [20, 10, 40, 30], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "PulmonaryTuberculosis"}],
    }
    json_dir = root / "annotations" / "json"
    json_dir.mkdir(parents=True)
    (json_dir / "TBX11K_train.json").write_text(json.dumps(coco))
    samples = {s.key: s for s in tbx11k.list_samples(root)}
    tb = samples["tb/tb0001.png"]
    assert tb.box_classes == ("PulmonaryTuberculosis",)
    assert tb.boxes[0] == pytest.approx((10.0, 5.0, 30.0, 20.0))  # JSON 200x100 -> image 100x50
    assert tb.annotation == json_dir / "TBX11K_train.json"
    assert samples["health/h0001.png"].boxes == ()
    assert tbx11k.list_samples(root, source="xml")[-1].boxes == ()


def test_malformed_xml_names_the_file(root: Path) -> None:
    bad = root / "annotations" / "xml" / "tb0001.xml"
    bad.write_text("<annotation><size><width>10</width>")
    with pytest.raises(DataError, match="tb0001.xml: is not valid XML") as info:
        tbx11k.list_samples(root)
    assert info.value.path == str(bad)


def test_missing_size_names_the_file(tmp_path: Path) -> None:
    path = _xml(tmp_path / "a.xml", "a", None, [("ActiveTuberculosis", 1, 1, 5, 5)])
    with pytest.raises(DataError, match="a.xml: has no <size>") as info:
        tbx11k.read_voc_xml(path)
    assert "Fix:" in str(info.value)
    no_width = tmp_path / "b.xml"
    no_width.write_text("<annotation><size><height>5</height></size></annotation>")
    with pytest.raises(DataError, match="b.xml: <size> has no <width>"):
        tbx11k.read_voc_xml(no_width)
    bad_coord = _xml(tmp_path / "c.xml", "c", (10, 10), [("ActiveTuberculosis", 1, 1, 5, 5)])
    bad_coord.write_text(bad_coord.read_text().replace("<xmax>5</xmax>", "<xmax>five</xmax>"))
    with pytest.raises(DataError, match="c.xml: <xmax> is 'five', not a number"):
        tbx11k.read_voc_xml(bad_coord)


def test_broken_json_and_image(root: Path) -> None:
    json_dir = root / "annotations" / "json"
    json_dir.mkdir(parents=True)
    (json_dir / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json: is not valid JSON"):
        tbx11k.list_samples(root)
    (json_dir / "x.json").write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(DataError, match="x.json: has a malformed COCO entry"):
        tbx11k.list_samples(root)
    (json_dir / "x.json").unlink()
    (root / "imgs" / "sick" / "s0001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="s0001.png: is not a readable image"):
        tbx11k.list_samples(root)


def test_not_a_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a TBX11K root"):
        tbx11k.list_samples(tmp_path)


@needs_real
def test_real_tb_subset() -> None:
    root = tbx11k.find_tbx11k_root(REAL / "imgs" / "tb")
    assert root == REAL
    samples = tbx11k.list_samples(REAL)
    assert len(samples) == 150 and all(s.tb and s.folder == "tb" for s in samples)
    assert all(s.size == (512, 512) for s in samples)
    assert all(s.boxes for s in samples)
    classes = {c for s in samples for c in s.box_classes}
    assert classes <= set(tbx11k.TB_BOX_CLASSES) and "ActiveTuberculosis" in classes
    assert sum(len(s.boxes) for s in samples) == 227
    for s in samples:  # rescaled from the original scan size into the 512x512 image
        for x0, y0, x1, y1 in s.boxes:
            assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    tb7 = next(s for s in samples if s.path.stem == "tb0007")
    # tb0007.xml: scan 1757x2022, box xmin=1058 ymin=249 xmax=1523 ymax=828
    assert tb7.boxes[0] == pytest.approx(
        (1057 * 512 / 1757, 248 * 512 / 2022, 1523 * 512 / 1757, 828 * 512 / 2022)
    )
    mask = tbx11k.sample_mask(tb7)
    assert mask.shape == (512, 512) and 0 < mask.float().mean() < 0.5
