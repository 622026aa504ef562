from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixelvote.data.dataset import Sample, load_dataset, resolve_background, split
from pixelvote.errors import DataError


def _img(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(path)


def test_folder_layout_with_masks_and_empty_class(tmp_path):
    _img(tmp_path / "images/lesion/a b (1).png")
    _img(tmp_path / "images/lesion/sub/c.jpg")
    _img(tmp_path / "images/normal/n.png")
    _img(tmp_path / "masks/lesion/a b (1).png")
    (tmp_path / "images/empty").mkdir()
    ds = load_dataset(tmp_path)
    assert ds.classes == ["lesion", "normal"]
    by_name = {s.path.name: s for s in ds.samples}
    assert by_name["a b (1).png"].mask == tmp_path / "masks/lesion/a b (1).png"
    assert by_name["c.jpg"].mask is None and by_name["c.jpg"].label == "lesion"
    assert any("empty" in p and "no images" in r for p, r in ds.problems)


def test_csv_manifest(tmp_path):
    _img(tmp_path / "x/1.png")
    _img(tmp_path / "x/2.png")
    (tmp_path / "m.csv").write_text("path,label,mask,group\nx/1.png,fire,,v1\nx/2.png,no_fire,,v2\n")
    ds = load_dataset(tmp_path / "m.csv")
    assert [(s.label, s.group) for s in ds.samples] == [("fire", "v1"), ("no_fire", "v2")]
    (tmp_path / "bad.csv").write_text("file,class\n")
    with pytest.raises(DataError, match="needs at least 'path' and 'label'"):
        load_dataset(tmp_path / "bad.csv")


def test_single_class_and_missing_folder_are_clear_errors(tmp_path):
    _img(tmp_path / "images/lesion/a.png")
    with pytest.raises(DataError, match="only one class"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="dataset not found"):
        load_dataset(tmp_path / "nope")


def test_background_resolution():
    assert resolve_background(["fire", "no_fire"], None) == "no_fire"
    assert resolve_background(["a", "b"], "b") == "b"
    with pytest.raises(DataError, match="cannot tell which class"):
        resolve_background(["a", "b"], None)
    with pytest.raises(DataError, match="Did you mean 'normal'"):
        resolve_background(["benign", "normal"], "normall")


def test_group_split_keeps_videos_together_and_stratifies(tmp_path):
    from pathlib import Path

    samples = []
    for v in range(10):
        for f in range(5):
            samples.append(Sample(Path(f"Video{v}_{f}.jpg"), "fire", group=f"Video{v}"))
    samples += [Sample(Path(f"n{i}.jpg"), "no_fire", group=f"n{i}") for i in range(30)]
    tr, va = split(samples, 0.2, seed=3)
    assert {s.group for s in tr}.isdisjoint({s.group for s in va})
    assert {s.label for s in va} == {"fire", "no_fire"}
    assert len(tr) + len(va) == len(samples)
    tr2, va2 = split(samples, 0.2, seed=3)
    assert [s.path for s in va2] == [s.path for s in va]


def test_group_pattern_from_file_names(tmp_path):
    for v in (1, 2):
        for f in range(3):
            _img(tmp_path / f"images/fire/Video{v}_{f:04d}.jpg")
    _img(tmp_path / "images/no_fire/photo.png")
    ds = load_dataset(tmp_path, group_pattern=r"^(Video\d+)")
    assert {s.group for s in ds.samples if s.label == "fire"} == {"Video1", "Video2"}
    assert [s.group for s in ds.samples if s.label == "no_fire"] == ["photo"]
    with pytest.raises(DataError, match="not a valid regular expression"):
        load_dataset(tmp_path, group_pattern="(")


def test_val_folder_is_used(tmp_path):
    _img(tmp_path / "train/images/a/1.png")
    _img(tmp_path / "train/images/normal/2.png")
    _img(tmp_path / "val/images/a/3.png")
    ds = load_dataset(tmp_path)
    assert [s.path.name for s in ds.val] == ["3.png"]
