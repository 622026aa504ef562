"""The shared reader of output folders, atomic writes, and the export/import entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_export_fixtures import EXPECTED, make_out

from pixelvote.errors import ConfigError, DataError
from pixelvote.export import FORMATS, IMPORT_FORMATS, export_annotations, import_annotations
from pixelvote.export.outputs import (
    atomic_path,
    check_key,
    iter_records,
    keys_from_names,
    open_output,
    write_json,
)


def test_open_output_reads_records_and_ignores_torn_last_line(tmp_path):
    folder = open_output(make_out(tmp_path))
    assert [r["key"] for r in folder.records] == list(EXPECTED)
    assert folder.classes.names == ("benign", "malignant", "normal")
    assert folder.classes.foreground == ("benign", "malignant")
    assert [folder.classes.value(n) for n in ("normal", "benign", "malignant")] == [0, 1, 2]
    for rec in folder.records:
        mask = folder.load_mask(rec)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, EXPECTED[rec["key"]][1])


def test_later_record_of_same_key_wins(tmp_path):
    path = tmp_path / "annotations.jsonl"
    rec = {"key": "k", "mask": "masks/k.png", "width": 2, "height": 3, "label": "a"}
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "label": "b"}) + "\n")
    assert [r["label"] for r in iter_records(path)] == ["b"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    out = make_out(tmp_path, torn=False)
    lines = (out / "annotations.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    (out / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 3") as err:
        open_output(out)
    assert err.value.path == str(out / "annotations.jsonl")


def test_missing_files_give_data_errors_naming_them(tmp_path):
    out = make_out(tmp_path)
    (out / "annotations.jsonl").unlink()
    with pytest.raises(DataError) as err:
        export_annotations(out, "png", tmp_path / "png")
    assert err.value.path == str(out / "annotations.jsonl")
    (out / "annotate.json").unlink()
    with pytest.raises(DataError) as err:
        open_output(out)
    assert err.value.path == str(out / "annotate.json")
    with pytest.raises(DataError, match="does not exist"):
        open_output(tmp_path / "nowhere")


def test_only_a_torn_line_is_no_records(tmp_path):
    out = make_out(tmp_path)
    (out / "annotations.jsonl").write_text('{"key": "x", "ma')
    with pytest.raises(DataError, match="no complete annotation record"):
        open_output(out)


def test_record_missing_fields(tmp_path):
    out = make_out(tmp_path)
    (out / "annotations.jsonl").write_text(json.dumps({"key": "x", "mask": "masks/x.png"}) + "\n")
    with pytest.raises(DataError, match="line 1: record lacks width, height, label"):
        open_output(out)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_missing_mask_file_is_named(tmp_path, fmt):
    out = make_out(tmp_path)
    (out / "masks" / "a" / "scan 01.png").unlink()
    with pytest.raises(DataError, match="mask file is missing") as err:
        export_annotations(out, fmt, tmp_path / "export.out")
    assert err.value.path == str(out / "masks" / "a" / "scan 01.png")


def test_mask_of_wrong_size_is_named(tmp_path):
    out = make_out(tmp_path)
    Image.new("L", (10, 10)).save(out / "masks" / "lesion.png")
    with pytest.raises(DataError, match="expected a mask of 37x23 .* but got 10x10") as err:
        export_annotations(out, "coco", tmp_path / "c.json")
    assert err.value.path == str(out / "masks" / "lesion.png")


def test_corrupt_mask_file(tmp_path):
    out = make_out(tmp_path)
    (out / "masks" / "bg.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot be read") as err:
        export_annotations(out, "png", tmp_path / "p")
    assert err.value.path == str(out / "masks" / "bg.png")


def test_unknown_label_in_record(tmp_path):
    out = make_out(tmp_path)
    text = (out / "annotations.jsonl").read_text().replace('"label": "benign"', '"label": "cyst"', 1)
    (out / "annotations.jsonl").write_text(text)
    with pytest.raises(DataError, match="'cyst'"):
        open_output(out)


def test_unknown_format_and_option(tmp_path):
    out = make_out(tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'labelstudio'"):
        export_annotations(out, "label-studio", tmp_path / "x.json")
    with pytest.raises(ConfigError, match="Did you mean 'coco'"):
        import_annotations("cocoo", tmp_path / "x.json", tmp_path / "o")
    with pytest.raises(ConfigError, match="no option 'coco_gtt'.*Did you mean 'coco_gt'"):
        export_annotations(out, "coco-results", tmp_path / "r.json", coco_gtt="x")
    with pytest.raises(ConfigError, match="takes no options"):
        export_annotations(out, "png", tmp_path / "p", colour=True)
    assert set(IMPORT_FORMATS) <= set(FORMATS)


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_keys_from_names_and_check_key():
    names = ["benign/x 1.png", "a/scan 01.png", "b/scan 01.png", "y.jpg"]
    assert keys_from_names(names) == ["x 1", "a/scan 01", "b/scan 01", "y"]
    assert check_key("a/scan 01") == "a/scan 01"
    for bad in ["../x", "/abs", "a//b", "", "a\\b", 3]:
        with pytest.raises(DataError):
            check_key(bad)
