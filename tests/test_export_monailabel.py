"""MONAI Label datastore export, checked against the datastore's pydantic model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel
from test_export_fixtures import EXPECTED, make_out, read_png

from pixelvote.errors import DataError
from pixelvote.export import export_annotations


# The model of monailabel/datastore/local.py (LocalDatastoreModel), restated to validate the file.
class DataModel(BaseModel):
    ext: str = ""
    info: dict[str, Any] = {}


class ImageLabelModel(BaseModel):
    image: DataModel
    labels: dict[str, DataModel] = {}


class LocalDatastoreModel(BaseModel):
    name: str
    description: str
    images_dir: str = ""
    labels_dir: str = "labels"
    objects: dict[str, ImageLabelModel] = {}


def test_datastore_layout(tmp_path):
    out = make_out(tmp_path)
    store = tmp_path / "store"
    path = export_annotations(out, "monailabel", store)
    assert path == store / "datastore_v2.json"
    model = LocalDatastoreModel.model_validate_json(path.read_text())
    assert (model.images_dir, model.labels_dir) == (".", "labels")
    ids = {"a/scan 01": "a__scan 01", "b/scan 01": "b__scan 01"}
    assert set(model.objects) == {ids.get(k, k) for k in EXPECTED}
    assert (store / "labels" / "final").is_dir()
    for key, (label, mask) in EXPECTED.items():
        image_id = ids.get(key, key)
        obj = model.objects[image_id]
        assert obj.image.ext == ".png" and obj.image.info["name"] == f"{image_id}.png"
        assert obj.image.info["pixelvote_key"] == key
        image = store / f"{image_id}.png"
        src = tmp_path / "images" / (f"{key}.png" if "/" in key else f"{label}/{key}.png")
        assert image.read_bytes() == src.read_bytes()
        original = obj.labels["original"]
        label_file = store / "labels" / "original" / f"{image_id}{original.ext}"
        values = read_png(label_file)
        expected = np.where(mask, {"benign": 1, "malignant": 2, "normal": 0}[label], 0)
        np.testing.assert_array_equal(values, expected)
        assert original.info["checksum"] == "SHA256:" + hashlib.sha256(label_file.read_bytes()).hexdigest()
        assert original.info["label_names"] == {"0": "normal", "1": "benign", "2": "malignant"}
    flags = model.objects["scan one"].labels["original"].info["pixelvote"]
    assert flags["flagged"] is True and flags["confidence"] == pytest.approx(0.55)


def test_existing_datastore_keeps_other_objects(tmp_path):
    out = make_out(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    other = {"image": {"ext": ".png", "info": {"name": "other.png"}}, "labels": {}}
    (store / "datastore_v2.json").write_text(
        json.dumps(
            {
                "name": "mine",
                "description": "d",
                "images_dir": ".",
                "labels_dir": "labels",
                "objects": {"other": other},
            }
        )
    )
    data = json.loads(export_annotations(out, "monailabel", store).read_text())
    assert data["name"] == "mine" and data["objects"]["other"] == other
    assert len(data["objects"]) == len(EXPECTED) + 1


def test_missing_image_and_foreign_layout(tmp_path):
    out = make_out(tmp_path)
    (tmp_path / "images" / "benign" / "lesion.png").unlink()
    with pytest.raises(DataError, match="image of record 'lesion' is missing"):
        export_annotations(out, "monailabel", tmp_path / "s1")
    store = tmp_path / "s2"
    store.mkdir()
    (store / "datastore_v2.json").write_text(
        json.dumps({"name": "n", "description": "", "images_dir": "imgs"})
    )
    with pytest.raises(DataError, match="elsewhere"):
        export_annotations(out, "monailabel", store)
