"""Smoke test of bench/segmenter_speed.py on a tiny run and segmenter: it finishes with its ratios."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_segmenter_speed_ends_with_the_ratios_as_json(tmp_path):
    from conftest import write_blob_dataset

    from pixelvote.engine.annotate import annotate
    from pixelvote.segment.train import SegConfig, train_segmenter
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    data = write_blob_dataset(tmp_path / "data", per_class=6)
    run = train(TrainConfig(data=data, out=tmp_path / "run", preset="tiny", epochs=1, image_size=48,
                            pretrained=False, mc_samples=2, val_fraction=0.4))
    annotate(run, data / "images", tmp_path / "ann", mc_samples=2, num_workers=0)
    cfg = SegConfig(epochs=1, image_size=64, batch_size=4, mode="all")
    seg = train_segmenter(tmp_path / "ann", tmp_path / "seg", cfg=cfg, pretrained=False, device="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "segmenter_speed.py"), "--run", str(run),
                        "--segmenter", str(seg), "--images", "4", "--batch", "2", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["ms_per_image"]) == {"ensemble", "plain", "segmenter", "segmenter_one_process"}
    values = [*result["ms_per_image"].values(), result["ensemble_over_segmenter"],
              result["plain_over_segmenter"], result["one_process_over_workers"]]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert math.isclose(result["ensemble_over_segmenter"],
                        result["ms_per_image"]["ensemble"] / result["ms_per_image"]["segmenter"])
    assert math.isclose(result["one_process_over_workers"],
                        result["ms_per_image"]["segmenter_one_process"] / result["ms_per_image"]["segmenter"])
    assert "faster than the run's ensemble path" in r.stdout and "worker processes make it" in r.stdout
