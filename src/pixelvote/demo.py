"""`pixelvote demo`: the whole path on a built-in synthetic dataset, in a few minutes on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np


def score_annotations(out: Path, truth_root: Path, background: str) -> dict[str, Any]:
    """Accuracy against the class folders and mean IoU against the masks, from annotations.jsonl."""
    from pixelvote.data.imageio import read_jsonl, read_mask

    n = correct = flagged = 0
    ious: list[float] = []
    for rec in read_jsonl(out / "annotations.jsonl"):
        path = Path(rec["image"])
        truth_label = path.parent.name
        n += 1
        correct += rec["label"] == truth_label
        flagged += bool(rec["flagged"])
        mask_path = truth_root / "masks" / truth_label / (path.stem + ".png")
        if truth_label != background and mask_path.exists():
            truth = read_mask(mask_path)
            pred = read_mask(out / rec["mask"])
            union = (truth | pred).sum()
            ious.append(float((truth & pred).sum() / union) if union else 1.0)
    return {"images": n, "accuracy": correct / max(n, 1), "mean_iou": float(np.mean(ious)) if ious else None,
            "iou_images": len(ious), "flagged": flagged}


def run_demo(where: str | Path = "pixelvote-demo", *, epochs: int = 4, per_class: int = 48,
             preset: str = "offline-os16", pretrained: bool = True, image_size: int = 160,
             seed: int = 0) -> dict[str, Any]:
    from pixelvote.data.imageio import check_out_dir
    from pixelvote.data.synthetic import make_dataset
    from pixelvote.engine.annotate import annotate
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    where = check_out_dir(where, "--where")
    # settings checked before anything is written
    cfg = TrainConfig(data=where / "train-data", out=where / "run", preset=preset, epochs=epochs,
                      image_size=image_size, batch_size=16, seed=seed, pretrained=pretrained, mc_samples=20,
                      patience=epochs)
    for sub in ("train-data", "new-images", "run", "annotations"):
        shutil.rmtree(where / sub, ignore_errors=True)
    make_dataset(where / "train-data", per_class=per_class, seed=seed)
    make_dataset(where / "new-images", per_class=max(8, per_class // 3), seed=seed + 1)
    train(cfg)
    annotate(where / "run", where / "new-images" / "images", where / "annotations", batch_size=16)
    scores = score_annotations(where / "annotations", where / "new-images", "normal")
    scores.update(run=str(where / "run"), annotations=str(where / "annotations"))
    return scores
