"""Evaluation metrics: hand-computed cases, independent cross-checks and property tests."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pixelvote.evaluate import metrics as m


def _mask(h: int, w: int, *cells: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(h, w, dtype=torch.bool)
    for i, j in cells:
        out[i, j] = True
    return out


masks = st.integers(0, 6).flatmap(
    lambda h: st.integers(0, 6).flatmap(
        lambda w: st.tuples(arrays(np.bool_, (h, w)), arrays(np.bool_, (h, w)))
    )
)


# --------------------------------------------------------------------------- IoU / Dice


def test_iou_and_dice_by_hand() -> None:
    a = _mask(4, 4, (0, 0), (0, 1), (1, 0), (1, 1))  # 4 pixels
    b = _mask(4, 4, (0, 1), (1, 1), (2, 1))  # 3 pixels, 2 shared
    assert m.mask_iou(a, b).item() == pytest.approx(2 / 5)
    assert m.mask_dice(a, b).item() == pytest.approx(4 / 7)
    assert m.mask_iou(a, a).item() == 1.0
    assert m.mask_iou(a, ~a).item() == 0.0


def test_empty_convention() -> None:
    empty = torch.zeros(3, 3, dtype=torch.bool)
    some = _mask(3, 3, (1, 1))
    assert m.mask_iou(empty, empty).item() == 1.0  # nothing there, nothing predicted
    assert m.mask_dice(empty, empty).item() == 1.0
    assert math.isnan(m.mask_iou(empty, empty, empty_score=math.nan).item())
    assert m.mask_iou(some, empty).item() == 0.0 and m.mask_iou(empty, some).item() == 0.0
    batch_p = torch.stack([some, empty])
    batch_t = torch.stack([some, empty])
    assert m.mean_iou(batch_p, batch_t) == 1.0
    assert m.mean_iou(batch_p, batch_t, empty_score=math.nan) == 1.0  # the empty pair is left out
    assert math.isnan(
        m.mean_iou(torch.zeros(0, 3, 3, dtype=torch.bool), torch.zeros(0, 3, 3, dtype=torch.bool))
    )


def test_accepts_numpy_and_01_numbers() -> None:
    a = np.array([[1, 0], [1, 1]], dtype=np.uint8)
    b = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert m.mask_iou(a, b).item() == pytest.approx(2 / 4)


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.zeros(3, 3), torch.zeros(3, 4), "expected `target` of the same shape"),
        (torch.zeros(3), torch.zeros(3), r"expected `pred` of shape \(H, W\)"),
        (torch.full((2, 2), 255), torch.zeros(2, 2), "expected `pred` to be a binary mask"),
    ],
)
def test_mask_validation(pred: torch.Tensor, target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        m.mask_iou(pred, target)


def test_wrong_type_is_type_error() -> None:
    with pytest.raises(TypeError, match="expected `pred` to be a torch.Tensor or numpy.ndarray but got list"):
        m.mask_iou([[1]], torch.ones(1, 1))


def test_against_sklearn_jaccard() -> None:
    from sklearn.metrics import f1_score, jaccard_score

    g = np.random.default_rng(1)
    for _ in range(20):
        p, t = g.random((7, 9)) > 0.6, g.random((7, 9)) > 0.4
        assert m.mask_iou(p, t).item() == pytest.approx(jaccard_score(t.ravel(), p.ravel()))
        assert m.mask_dice(p, t).item() == pytest.approx(f1_score(t.ravel(), p.ravel()))


@settings(max_examples=60, deadline=None)
@given(masks)
def test_iou_properties(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    iou, dice = m.mask_iou(a, b).item(), m.mask_dice(a, b).item()
    assert iou == m.mask_iou(b, a).item()  # symmetric
    assert 0.0 <= iou <= 1.0 and 0.0 <= dice <= 1.0
    assert dice == pytest.approx(2 * iou / (1 + iou))  # Dice is a monotone function of IoU
    stats = m.PixelStats().update(a, b)
    assert stats.intersection <= min(stats.pred_area, stats.target_area)  # intersection never grows a mask
    assert stats.union >= max(stats.pred_area, stats.target_area)
    # shrinking the prediction to its overlap never lowers IoU against the truth
    assert m.mask_iou(a & b, b).item() >= iou - 1e-12


# --------------------------------------------------------------------------- accumulator


def test_pixel_stats_by_hand() -> None:
    a = _mask(2, 2, (0, 0), (0, 1))
    b = _mask(2, 2, (0, 0))
    stats = m.PixelStats().update(a, b).update(b, b)
    out = stats.compute()
    assert (stats.intersection, stats.union, stats.pred_area, stats.target_area) == (2, 3, 3, 2)
    assert out["mean_iou"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["pooled_iou"] == pytest.approx(2 / 3)
    assert out["mean_dice"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert out["pooled_dice"] == pytest.approx(4 / 5)


def test_pixel_stats_merge_is_exact_and_order_free() -> None:
    g = np.random.default_rng(2)
    preds, targets = g.random((40, 12, 12)) > 0.5, g.random((40, 12, 12)) > 0.7
    whole = m.PixelStats().update(preds, targets)
    parts = [m.PixelStats().update(preds[i : i + 7], targets[i : i + 7]) for i in range(0, 40, 7)]
    random.Random(0).shuffle(parts)
    merged = sum(parts)
    assert merged == whole  # every field, exactly
    assert merged.compute() == whole.compute()
    assert whole.compute()["mean_iou"] == pytest.approx(m.mean_iou(preds, targets), abs=1e-15)
    with pytest.raises(ValueError, match="same empty_score"):
        m.PixelStats(empty_score=math.nan) + m.PixelStats()


def test_pixel_stats_empty() -> None:
    out = m.PixelStats().compute()
    assert out["images"] == 0 and math.isnan(out["mean_iou"]) and math.isnan(out["pooled_iou"])
    nan_stats = m.PixelStats(empty_score=math.nan).update(torch.zeros(2, 2), torch.zeros(2, 2))
    assert nan_stats.scored == 0 and nan_stats.both_empty == 1 and math.isnan(nan_stats.compute()["mean_iou"])


# --------------------------------------------------------------------------- boxes


def test_mask_to_box_and_back() -> None:
    mask = _mask(5, 6, (1, 2), (3, 4))
    assert m.mask_to_box(mask) == (2, 1, 5, 4)
    assert m.mask_to_box(torch.zeros(3, 3)) is None
    filled = m.boxes_to_mask([(2, 1, 5, 4)], (5, 6))
    assert filled.sum() == 9 and filled[1:4, 2:5].all()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 9), st.integers(0, 9), st.integers(1, 10), st.integers(1, 10))
def test_box_round_trip(x0: int, y0: int, w: int, h: int) -> None:
    box = (x0, y0, min(x0 + w, 12), min(y0 + h, 11))
    assert m.mask_to_box(m.boxes_to_mask([box], (11, 12))) == box


def test_boxes_to_mask_union_clip_and_fractional() -> None:
    mask = m.boxes_to_mask([(0, 0, 2, 2), (1, 1, 3, 3), (-5, 3, 100, 4)], (4, 4))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # pixel centres decide: [0.4, 1.6) covers the centres 0.5 and 1.5
    assert m.boxes_to_mask([(0.4, 0.0, 1.6, 1.0)], (1, 3)).tolist() == [[True, True, False]]
    assert not m.boxes_to_mask([], (3, 3)).any()
    with pytest.raises(ValueError, match=r"expected `size` to be \(height, width\)"):
        m.boxes_to_mask([], (3,))
    with pytest.raises(ValueError, match="x1 >= x0"):
        m.boxes_to_mask([(3, 0, 1, 1)], (3, 3))


def test_box_iou_by_hand_and_against_torchvision() -> None:
    assert m.box_iou((0, 0, 2, 2), (1, 1, 3, 3)).item() == pytest.approx(1 / 7)
    assert m.box_iou((0, 0, 1, 1), (2, 2, 3, 3)).item() == 0.0
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(6, 2, generator=g) * 10
    a = torch.cat([xy, xy + torch.rand(6, 2, generator=g) * 5], 1)
    xy = torch.rand(4, 2, generator=g) * 10
    b = torch.cat([xy, xy + torch.rand(4, 2, generator=g) * 5], 1)
    torch.testing.assert_close(m.box_iou(a, b), torchvision.ops.box_iou(a.double(), b.double()))


def test_pointing_game() -> None:
    sal = torch.zeros(50, 50)
    sal[10, 10] = 1.0
    assert m.pointing_game(sal, boxes=[(5, 5, 15, 15)]) is True
    assert m.pointing_game(sal, boxes=[(24, 9, 30, 12)]) is True  # nearest pixel 14 px away < 15
    assert m.pointing_game(sal, boxes=[(25, 9, 30, 12)]) is False  # 15 px away: not < 15
    assert m.pointing_game(sal, boxes=[(25, 9, 30, 12)], tolerance=16) is True
    assert m.pointing_game(sal, boxes=[(11, 10, 12, 11)], tolerance=0) is False
    assert m.pointing_game(sal, mask=torch.zeros(50, 50)) is None  # nothing to point at
    with pytest.raises(ValueError, match="exactly one of `mask` and `boxes`"):
        m.pointing_game(sal)


def test_centred_box_prior() -> None:
    prior = m.centred_box_prior((8, 12))
    assert m.mask_to_box(prior) == (3, 2, 9, 6)  # half the width and height, centred
    assert prior.sum() == 6 * 4
    assert m.centred_box((512, 512)) == (128.0, 128.0, 384.0, 384.0)


# --------------------------------------------------------------------------- threshold sweep


def test_iou_sweep_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(4)
    soft = torch.rand(3, 9, 7, generator=g)
    soft[0, 0, 0] = 0.5  # exactly on a threshold: >= keeps it
    target = torch.rand(3, 9, 7, generator=g) > 0.5
    th = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    got = m.iou_sweep(soft, target, th)
    want = torch.stack([m.mask_iou(soft >= t, target) for t in th.tolist()], 1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(m.iou_sweep(soft[1], target[1], th), want[1])


def test_sweep_stats_merge_and_best() -> None:
    soft = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])
    target = torch.tensor([[[True, False], [False, False]]])
    out = m.SweepStats((0.1, 0.5, 0.95)).update(soft, target).compute()
    assert out["mean_iou"] == pytest.approx([1 / 4, 1 / 2, 0.0])
    assert out["best_threshold"] == 0.5 and out["best_mean_iou"] == pytest.approx(0.5)
    g = torch.Generator().manual_seed(5)
    maps, masks_ = torch.rand(10, 6, 6, generator=g), torch.rand(10, 6, 6, generator=g) > 0.5
    whole = m.SweepStats().update(maps, masks_)
    merged = m.SweepStats().update(maps[:4], masks_[:4]) + m.SweepStats().update(maps[4:], masks_[4:])
    assert merged == whole
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        m.SweepStats().update(maps * 2, masks_)


# --------------------------------------------------------------------------- classification


def test_classification_by_hand() -> None:
    y = [0, 0, 1, 1, 1]
    p = [0.1, 0.6, 0.7, 0.8, 0.4]  # predictions 0 1 1 1 0
    out = m.classification_metrics(y, p, class_names=["healthy", "tb"])
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["confusion_matrix"] == [[1, 1], [1, 2]]
    # AUROC: positives 0.7, 0.8, 0.4 vs negatives 0.1, 0.6 -> 5 of 6 pairs ordered
    assert out["auroc"] == pytest.approx(5 / 6)
    assert out["f1_macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_auroc_multiclass_matches_sklearn_and_absent_class() -> None:
    from sklearn.metrics import roc_auc_score

    g = np.random.default_rng(6)
    probs = g.dirichlet(np.ones(3), size=60)
    y = g.integers(0, 3, 60)
    assert m.auroc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m.auroc(np.zeros(60, dtype=int), probs) is None
    only_one = m.classification_metrics(np.zeros(5, dtype=int), np.full(5, 0.2))
    assert only_one["auroc"] is None and only_one["accuracy"] == 1.0


def test_classification_validation() -> None:
    with pytest.raises(ValueError, match=r"expected `probs` of shape \(3,\) or \(3, C\)"):
        m.classification_metrics([0, 1, 1], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="class indices below 2"):
        m.classification_metrics([0, 2], [0.1, 0.9])
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        m.auroc([0, 1], [-1.0, 3.0])


# --------------------------------------------------------------------------- calibration


def _ece_by_hand(conf: list[float], correct: list[float], n_bins: int = 15) -> float:
    """Independent reference: loop over bins [k/n, (k+1)/n), with 1.0 in a bin of its own."""
    total = 0.0
    edges = [k / n_bins for k in range(n_bins + 1)]
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        k = n_bins if c >= 1.0 else max(k for k in range(n_bins) if c >= edges[k])
        groups.setdefault(k, []).append(i)
    for members in groups.values():
        acc = sum(correct[i] for i in members) / len(members)
        mean_conf = sum(conf[i] for i in members) / len(members)
        total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


def test_ece_by_hand_small() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])  # correct, wrong, correct, wrong
    # bins (15): 0.9 -> 13, 0.8 -> 12, 0.55 -> 8, 0.7 -> 10; each alone: mean |acc - conf|
    want = (0.1 + 0.8 + 0.45 + 0.7) / 4
    assert m.expected_calibration_error(probs, y) == pytest.approx(want)


def test_ece_against_independent_loop() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 4, generator=g) * 2
    probs = logits.softmax(1).double()
    y = torch.randint(0, 4, (300,), generator=g)
    probs[:4] = torch.nn.functional.one_hot(y[:4], 4).double()  # confidence exactly 1.0
    conf, pred = probs.max(1)
    want = _ece_by_hand(conf.tolist(), (pred == y).double().tolist())
    assert m.expected_calibration_error(probs, y) == pytest.approx(want, abs=1e-12)
    bins = m.reliability_bins(probs, y)
    assert sum(bins["count"]) == 300 and len(bins["lower"]) == 15
    assert bins["ece"] == pytest.approx(want, abs=1e-12)


def test_ece_against_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(8)
    probs = (torch.randn(400, 3, generator=g) * 2).softmax(1)
    y = torch.randint(0, 3, (400,), generator=g)
    want = tm.multiclass_calibration_error(probs, y, num_classes=3, n_bins=15, norm="l1").item()
    assert m.expected_calibration_error(probs, y) == pytest.approx(want, abs=1e-6)
    p1 = torch.rand(400, generator=g)
    y1 = (torch.rand(400, generator=g) < p1).long()
    want1 = tm.binary_calibration_error(p1, y1, n_bins=15, norm="l1").item()
    assert m.expected_calibration_error(p1, y1) == pytest.approx(want1, abs=1e-6)


# --------------------------------------------------------------------------- selective prediction


def test_risk_coverage_by_hand() -> None:
    rc = m.risk_coverage(risk=[1, 0, 0, 1], uncertainty=[0.9, 0.1, 0.2, 0.5])
    # order by uncertainty: risks 0, 0, 1, 1 -> selective risk 0, 0, 1/3, 1/2
    assert rc.risk.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 2])
    assert rc.coverage.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rc.aurc == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert rc.e_aurc == pytest.approx(0.0)  # this ranking is the best possible
    assert rc.at(0.5) == 0.0 and rc.at(0.8) == pytest.approx(1 / 2) and rc.at(0.75) == pytest.approx(1 / 3)
    d = rc.to_dict()
    assert d["risk_at_80"] == pytest.approx(0.5) and d["aurc"] == pytest.approx(rc.aurc)


def test_risk_coverage_ties_are_order_free() -> None:
    a = m.risk_coverage([1, 0, 0.5], [0.3, 0.3, 0.1])
    b = m.risk_coverage([0, 1, 0.5], [0.3, 0.3, 0.1])
    torch.testing.assert_close(a.risk, b.risk)
    assert a.risk.tolist() == pytest.approx([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="NaN or inf"):
        m.risk_coverage([math.nan], [0.0])


def test_flag_summary_by_hand() -> None:
    correct = [True, False, False, True, True]
    flagged = [False, True, False, True, False]
    out = m.flag_summary(correct, flagged, iou=[0.5, 0.1, math.nan, 0.3, 0.7])
    assert out["errors"] == 2 and out["errors_caught"] == 0.5
    assert out["flag_rate"] == pytest.approx(0.4) and out["flag_precision"] == 0.5
    assert out["accuracy_flagged"] == 0.5 and out["accuracy_unflagged"] == pytest.approx(2 / 3)
    assert out["mean_iou_flagged"] == pytest.approx(0.2) and out["mean_iou_unflagged"] == pytest.approx(0.6)
    none = m.flag_summary([True, True], [False, False])
    assert none["errors_caught"] is None and none["accuracy_flagged"] is None
