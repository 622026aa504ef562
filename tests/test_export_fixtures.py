"""Small synthetic annotation output folders for the export tests (helpers; no tests here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ["benign", "malignant", "normal"]
BACKGROUND = "normal"


def _masks() -> dict[str, tuple[str, np.ndarray, float, list[str]]]:
    """key -> (label, mask (h, w) bool, probability, reasons)."""
    lesion = np.zeros((23, 37), bool)  # odd size, a blob plus a hole
    lesion[5:15, 8:30] = True
    lesion[9:11, 12:20] = False
    edges = np.zeros((31, 50), bool)  # touches all four borders; box corner pixel set
    edges[0, :7] = True
    edges[:, 49] = True
    edges[30, 20:25] = True
    edges[10:12, 0] = True
    sub_a = np.zeros((17, 19), bool)
    sub_a[3:9, 4:6] = True
    sub_b = np.zeros((17, 19), bool)
    sub_b[1:2, 1:18] = True
    sub_b[15, 3] = True
    full = np.ones((9, 11), bool)
    return {
        "lesion": ("benign", lesion, 0.91, []),
        "scan one": ("malignant", edges, 0.55, ["disagreement", "low_confidence"]),
        "a/scan 01": ("benign", sub_a, 0.80, []),
        "b/scan 01": ("malignant", sub_b, 0.97, []),
        "bg": ("normal", np.zeros((13, 21), bool), 0.99, []),
        "empty flagged": ("benign", np.zeros((12, 10), bool), 0.60, ["empty_mask"]),
        "full": ("malignant", full, 0.70, []),
    }


EXPECTED = {k: (label, mask) for k, (label, mask, _, _) in _masks().items()}


def record(
    key: str, label: str, mask: np.ndarray, prob: float, reasons: list[str], image: Path
) -> dict[str, Any]:
    h, w = mask.shape
    others = [c for c in CLASSES if c != label]
    return {
        "image": str(image),
        "key": key,
        "mask": f"masks/{key}.png",
        "overlay": f"overlays/{key}.png",
        "uncertainty": f"uncertainty/{key}.png",
        "width": w,
        "height": h,
        "label": label,
        "label_index": CLASSES.index(label),
        "probability": prob,
        "probabilities": {label: prob, others[0]: (1 - prob) / 2, others[1]: (1 - prob) / 2},
        "target_class": label,
        "members": {},
        "agreement": 0.5 if "disagreement" in reasons else 1.0,
        "flagged": bool(reasons),
        "reasons": reasons,
        "mask_area": int(mask.sum()),
        "mask_fraction": float(mask.mean()),
        "threshold": 0.5,
        "uncertainty_mean": 0.25 if reasons else 0.05,
    }


def make_out(tmp_path: Path, *, torn: bool = True) -> Path:
    """Write images under tmp_path/images and an output folder tmp_path/out; return the folder."""
    out = tmp_path / "out"
    images = tmp_path / "images"
    (out / "masks").mkdir(parents=True)
    lines = []
    for key, (label, mask, prob, reasons) in _masks().items():
        h, w = mask.shape
        rel = key if "/" in key else f"{label}/{key}"
        image = images / f"{rel}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        rgb = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(image)
        mpath = out / "masks" / f"{key}.png"
        mpath.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mpath)
        lines.append(json.dumps(record(key, label, mask, prob, reasons, image)))
    meta = {
        "format_version": 1,
        "classes": CLASSES,
        "background": BACKGROUND,
        "run": str(tmp_path / "runs" / "demo"),
        "consensus": {},
        "created": "2025-01-01T00:00:00+00:00",
    }
    (out / "annotate.json").write_text(json.dumps(meta))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"image": "/x/half.png", "key": "half", "mask": "ma'
    (out / "annotations.jsonl").write_text(text)
    return out


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)
