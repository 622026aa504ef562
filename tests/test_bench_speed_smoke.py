"""Smoke test of bench/speed.py: the quick run finishes and its last line is the JSON the issue asks for."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelvote.models.ensemble import Ensemble
from pixelvote.models.member import build_member
from tests.conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]
SPEED = ROOT / "bench" / "speed.py"
RATIOS = {"core_over_floor", "naive_over_core", "end_to_end_over_floor"}


def _speed_module():  # type: ignore[no-untyped-def]
    return load_bench("speed")


def _positive_finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "busi" / "images").exists(),
                    reason="needs the real images in ../shared/data")
def test_quick_run_ends_with_the_ratios_as_json():
    r = subprocess.run([sys.executable, str(SPEED), "--quick", "--no-naive"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert list(result["ratios"]) == ["offline@128"]
    for key, ratios in result["ratios"].items():
        assert set(ratios) == RATIOS, key
        assert ratios["naive_over_core"] is None  # --no-naive
        assert _positive_finite(ratios["core_over_floor"])
        assert _positive_finite(ratios["end_to_end_over_floor"])
        ms = result["ms_per_image"][key]
        assert all(_positive_finite(ms[k]) for k in ("floor", "core", "end_to_end"))
    mem = result["memory"]
    assert mem["images"] == [20, 60] and all(_positive_finite(v) for v in mem["peak_rss_mib"])
    assert math.isfinite(mem["growth"])
    assert "core/floor" in r.stdout  # the table was printed before the JSON


def _tiny_ensemble() -> Ensemble:
    torch.manual_seed(0)
    members = [build_member(n, 2, pretrained=False).eval() for n in ("tiny_cnn_a", "tiny_cnn_b")]
    return Ensemble(members, ["lesion", "normal"], "normal", 32)


def test_the_timed_functions_run_and_leave_the_members_as_they_were():
    speed = _speed_module()
    ens = _tiny_ensemble()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    speed.floor_fn(ens, x)()
    speed.core_fn(ens, x, 3, [0, 1])()
    t = speed.time_core(ens, x, 3, 1, naive=False, device=torch.device("cpu"))
    assert set(t) == {"floor", "core"} and all(v > 0 for v in t.values())
    assert not any(m.training for member in ens.members for m in member.modules())


def test_naive_baseline_removes_its_hooks_and_restores_dropout():
    pytest.importorskip("pytorch_grad_cam")
    speed = _speed_module()
    ens = _tiny_ensemble()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    speed.naive_fn(ens, x, 3)()
    for member in ens.members:
        assert not any(m.training for m in member.modules())  # dropout is off again
        assert all(not m._forward_hooks for m in member.modules())  # pytorch-grad-cam's hooks are gone
        assert all(p.grad is None for p in member.parameters())
