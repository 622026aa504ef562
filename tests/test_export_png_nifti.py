"""Class-index PNG and NIfTI exports."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_export_fixtures import EXPECTED, make_out, read_png

from pixelvote.errors import ConfigError
from pixelvote.export import export_annotations

VALUES = {"normal": 0, "benign": 1, "malignant": 2}


def test_png_class_index_masks(tmp_path):
    to = export_annotations(make_out(tmp_path), "png", tmp_path / "png")
    doc = json.loads((to / "classes.json").read_text())
    assert doc["classes"] == {"0": "normal", "1": "benign", "2": "malignant"}
    assert doc["background"] == "normal"
    for key, (label, mask) in EXPECTED.items():
        got = read_png(to / "masks" / f"{key}.png")
        assert got.dtype == np.uint8 and got.shape == mask.shape
        np.testing.assert_array_equal(got, np.where(mask, VALUES[label], 0))
        assert doc["images"][key]["file"] == f"masks/{key}.png"
    assert doc["images"]["scan one"]["flagged"] is True
    assert (to / "masks" / "a" / "scan 01.png").is_file()


def test_nifti_volumes(tmp_path):
    nib = pytest.importorskip("nibabel")
    from pixelvote.export.nifti import read_nifti_mask

    to = export_annotations(make_out(tmp_path), "nifti", tmp_path / "nii")
    assert "identity" in (to / "NOTE.txt").read_text()
    doc = json.loads((to / "classes.json").read_text())
    assert doc["classes"]["2"] == "malignant"
    for key, (label, mask) in EXPECTED.items():
        path = to / f"{key}.nii.gz"
        img = nib.load(str(path))
        assert img.shape == (mask.shape[1], mask.shape[0])
        np.testing.assert_array_equal(img.affine, np.eye(4))
        np.testing.assert_array_equal(read_nifti_mask(path), np.where(mask, VALUES[label], 0))
    assert not list(to.rglob(".tmp-*"))


def test_nifti_without_nibabel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ConfigError, match="nibabel") as err:
        export_annotations(make_out(tmp_path), "nifti", tmp_path / "nii")
    assert err.value.fix == "pip install nibabel"
