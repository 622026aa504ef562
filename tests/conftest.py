"""Tiny seeded models and generated data: no network, no real weights, seconds per test."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelvote.models.ensemble import Ensemble
from pixelvote.models.member import build_member


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def tiny_member():
    def make(name: str = "tiny_cnn_a", k: int = 2, dropout: float = 0.3, cam_layer: str | None = None):
        torch.manual_seed(1)
        return build_member(name, k, dropout=dropout, pretrained=False, cam_layer=cam_layer).eval()

    return make


@pytest.fixture
def tiny_ensemble(tiny_member) -> Ensemble:
    return Ensemble([tiny_member("tiny_cnn_a"), tiny_member("tiny_cnn_b")], ["lesion", "normal"], "normal",
                    64)


def load_bench(name: str):  # type: ignore[no-untyped-def]
    """``bench/<name>.py`` as a module (``bench`` is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_blob_dataset(root: Path, per_class: int = 10, size: tuple[int, int] = (48, 64)) -> Path:
    """images/{lesion,normal}/*.png with masks for the lesions (bright squares on noise)."""
    rng = np.random.default_rng(0)
    for c in ("lesion", "normal"):
        (root / "images" / c).mkdir(parents=True, exist_ok=True)
        (root / "masks" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (rng.random(size) * 80).astype(np.uint8)
            if c == "lesion":
                m = np.zeros(size, np.uint8)
                y, x = rng.integers(4, size[0] - 16), rng.integers(4, size[1] - 16)
                img[y:y + 12, x:x + 12] += 150
                m[y:y + 12, x:x + 12] = 255
                Image.fromarray(m).save(root / "masks" / c / f"{c} {i}.png")
            Image.fromarray(img).save(root / "images" / c / f"{c} {i}.png")
    return root


@pytest.fixture
def blob_dataset(tmp_path: Path) -> Path:
    return write_blob_dataset(tmp_path / "data")


def val_manifest(run: Path, path: Path) -> Path:
    """A CSV manifest (a ``path`` column) of the run's validation split: what ``evaluate`` scores by default,
    for annotating the same images."""
    val = json.loads((run / "split.json").read_text())["val"]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["path"], *([p] for p in val)])
    return path


def read_records(out: Path) -> dict[str, dict]:
    """An annotation folder's records by key."""
    return {r["key"]: r for r in map(json.loads, (out / "annotations.jsonl").read_text().splitlines())}


def scored_masks(metrics: dict, ann: Path, data: Path):  # type: ignore[no-untyped-def]
    """``(row, record, predicted mask, truth mask)`` for each of ``evaluate``'s per-image rows that has an
    IoU, with the mask PNG that ``annotate`` wrote into ``ann`` for the same image."""
    recs = read_records(ann)
    for row in metrics["per_image"]:
        if row["iou"] is None:
            continue
        rec = recs[row["key"]]
        pred = np.asarray(Image.open(ann / rec["mask"])) > 0
        truth = np.asarray(Image.open(data / "masks" / row["truth"] / f"{row['key']}.png")) > 0
        yield row, rec, pred, truth


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree fully."""
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0
