"""Evaluation report: self-contained HTML, metrics.json round trip, expected numbers on the page."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelvote.evaluate import metrics as m
from pixelvote.evaluate.report import write_report


def _metrics() -> dict:
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.7, 0.8, 0.4, 0.2, 0.9, 0.95])
    ens = m.classification_metrics(y, p, class_names=["healthy", "tb"])
    truth = torch.zeros(2, 8, 8, dtype=torch.bool)
    truth[:, 2:6, 2:6] = True
    pred = torch.zeros(2, 8, 8, dtype=torch.bool)
    pred[:, 2:6, 2:4] = True  # IoU 0.5 on each image
    consensus = m.PixelStats().update(pred, truth).compute()
    prior = m.PixelStats().update(torch.stack([m.centred_box_prior((8, 8))] * 2), truth).compute()
    sweep = m.SweepStats((0.0, 0.5, 1.0)).update(torch.rand(2, 8, 8), truth).compute()
    rc = m.risk_coverage((p.round() != y).astype(float), -np.abs(p - 0.5)).to_dict()
    rc["uncertainty"] = "1 - confidence"
    return {
        "dataset": "tbx11k",
        "classes": ["healthy", "tb"],
        "n_images": 8,
        "classification": {"ensemble": ens, "members": {"resnet50": ens}},
        "pixel": {
            "protocol": "box",
            "images": "positives",
            "empty_score": 1.0,
            "consensus": consensus,
            "members": {"resnet50": consensus},
            "prior": prior,
            "pointing_game": {"consensus": 0.75},
        },
        "threshold_sweep": sweep,
        "calibration": m.reliability_bins(p, y),
        "risk_coverage": {"classification": rc},
        "flags": m.flag_summary(p.round() == y, [0, 1, 0, 0, 1, 0, 0, 0]),
        "fusion": {
            "columns": ["rule", "mean IoU"],
            "rows": [["intersection", 0.2468], ["mean >= 0.5", 0.3579]],
        },
        "extra_tensor": torch.tensor([1.5, math.nan]),
    }


def _gallery() -> list[dict]:
    g = np.random.default_rng(0)
    image = (g.random((24, 32, 3)) * 255).astype(np.uint8)
    return [
        {
            "image": image,
            "truth": g.random((24, 32)) > 0.5,
            "consensus": torch.rand(24, 32) > 0.5,
            "members": {"resnet50": g.random((6, 8)), "densenet121": g.random((24, 32))},
            "uncertainty": g.random((24, 32)),
            "caption": "tb0001 <IoU 0.41>",
            "group": "worst",
        },
        {"image": image[:, :, 0], "caption": "grey image only", "group": "flagged"},
    ]


def test_report_is_self_contained_with_numbers(tmp_path: Path) -> None:
    path = write_report(_metrics(), _gallery(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page, flags=re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    # classification: accuracy 6/8, the paper's TBX11K row, the confusion matrix counts
    assert "75.00" in page and "93.04" in page and "36.07" in page
    assert "<td>healthy</td><td>2</td><td>1</td>" in page
    # localisation: consensus IoU 50.00, Dice 66.67; the prior row sits beside it
    assert "<td>50.00</td>" in page and "66.67" in page and "centred-box prior" in page
    assert "0.2468" in page and "0.3579" in page  # fusion table
    assert "tb0001 &lt;IoU 0.41&gt;" in page  # captions escaped
    assert page.count('alt="case"') == 2
    assert "fire" not in page.split("Classification")[1].split("</table>")[0]  # only the matching paper row


def test_metrics_json_round_trip(tmp_path: Path) -> None:
    metrics = _metrics()
    write_report(metrics, [], tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["format_version"] == 1
    assert data["classification"]["ensemble"]["accuracy"] == pytest.approx(0.75)
    assert data["pixel"]["consensus"]["mean_iou"] == pytest.approx(0.5)
    assert data["extra_tensor"] == [1.5, None]  # NaN becomes null: strict JSON
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_minimal_metrics_and_bad_gallery(tmp_path: Path) -> None:
    page = write_report({}, [], tmp_path).read_text()
    assert "93.04" not in page  # no sections without data
    with pytest.raises(ValueError, match=r"expected gallery\[0\]\['image'\] of dtype uint8"):
        write_report({}, [{"image": np.zeros((4, 4, 3))}], tmp_path)
    with pytest.raises(ValueError, match=r"expected gallery\[0\]\['truth'\] of shape \(H, W\)"):
        write_report({}, [{"image": np.zeros((4, 4, 3), np.uint8), "truth": np.zeros((1, 4, 4))}], tmp_path)
    with pytest.raises(TypeError, match="expected JSON-compatible metrics"):
        write_report({"x": object()}, [], tmp_path)


def test_importing_pixelvote_evaluate_does_not_load_matplotlib() -> None:
    code = (
        "import sys, pixelvote.evaluate.report, pixelvote.evaluate.metrics, pixelvote.data.tbx11k;"
        "print('matplotlib' in sys.modules, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
