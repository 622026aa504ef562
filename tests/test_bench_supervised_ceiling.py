"""bench/supervised_ceiling.py on tiny synthetic data: a segmenter and a colour histogram trained on the true
masks of some groups, scored on the held-out groups' masked images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_bench


def _bench():  # type: ignore[no-untyped-def]
    return load_bench("supervised_ceiling")


def _write(root: Path) -> Path:
    """Two 'videos' of red squares on grey noise (masked), and plain noise as the background class."""
    rng = np.random.default_rng(0)
    for c in ("fire", "no_fire"):
        (root / "images" / c).mkdir(parents=True)
        (root / "masks" / c).mkdir(parents=True)
    for v in ("Video01", "Video02"):
        for i in range(4):
            img = np.repeat((rng.random((32, 32, 1)) * 80).astype(np.uint8), 3, axis=2)
            m = np.zeros((32, 32), np.uint8)
            y, x = rng.integers(2, 18, size=2)
            img[y:y + 12, x:x + 12] = (230, 60, 40)
            m[y:y + 12, x:x + 12] = 255
            Image.fromarray(img).save(root / "images" / "fire" / f"{v}_{i:04d}.png")
            Image.fromarray(m).save(root / "masks" / "fire" / f"{v}_{i:04d}.png")
    for i in range(4):
        img = np.repeat((rng.random((32, 32, 1)) * 80).astype(np.uint8), 3, axis=2)
        Image.fromarray(img).save(root / "images" / "no_fire" / f"photo {i}.png")
    return root


ARGS = ["--background", "no_fire", "--group-pattern", r"^(Video\d+)", "--image-size", "64", "--epochs", "1",
        "--no-pretrained", "--no-crf", "--colour-bins", "8"]


def test_each_fold_is_scored_on_its_held_out_groups_only(tmp_path, capsys) -> None:
    data = _write(tmp_path / "data")
    _bench().main(["--data", str(data), "--folds", "Video01;Video02", *ARGS])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 8 and sorted(out["per_group"]) == ["Video01", "Video02"]
    hist = out["mean_iou"]["colour histogram (8 bins)"]
    # the squares' red is in no other pixel: the histogram learned on the other video finds them exactly
    assert hist == pytest.approx(1.0)
    assert set(out["mean_iou"]) >= {"segmenter > 0.3", "segmenter > 0.5", "segmenter > 0.7"}
    assert all(0.0 <= v <= 1.0 for v in out["mean_iou"].values())


@pytest.mark.parametrize(("folds", "extra", "message"), [
    ("Video09", [], "Video09"),  # a group the data does not have
    ("Video01", ["--image-size", "100"], "--image-size.*multiple of 32"),  # a size the segmenter cannot take
    ("Video01,Video02", [], "left to train on"),  # every masked group held out
    ("Video01", ["--colour-bins", "12"], "--colour-bins 12"),  # bins that do not divide 256
])
def test_bad_arguments_are_a_clear_error(tmp_path, folds, extra, message) -> None:
    data = _write(tmp_path / "data")
    with pytest.raises(SystemExit, match=message):
        _bench().main(["--data", str(data), "--folds", folds, *ARGS, *extra])
