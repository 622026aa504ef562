"""Smoke test of bench/cost_table.py: a small run finishes and its last line holds every figure the cost
table in pixelvote.evaluate.selection is made of."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pixelvote.refine import crf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "fire" / "images").exists(),
                    reason="needs the fire frames in ../shared/data")
@pytest.mark.skipif(not crf.available(), reason="the CRF needs pydensecrf2 (pip install 'pixelvote[crf]')")
def test_a_small_run_prints_the_tables_figures_as_json() -> None:
    args = ["--repeats", "1", "--batch", "2", "--models", "efficientnet_lite0", "--sizes", "64,96",
            "--iterations", "1,5"]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cost_table.py"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["forward_ms"]) == {"efficientnet_lite0"}
    assert set(out["crf_ms"]) == {"64x1", "64x5", "96x1", "96x5"}
    assert len(out["crf_fit"]) == 3
    figures = [*out["forward_ms"].values(), *out["crf_ms"].values(), out["colour_ms"], out["guided_ms"]]
    assert all(math.isfinite(v) and v > 0 for v in figures)
    assert "fit:" in r.stdout and "forward efficientnet_lite0" in r.stdout
