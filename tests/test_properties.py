"""Property-based tests (hypothesis) of the consensus and the mask metrics over random maps and masks:
outputs stay in range, IoU is symmetric and in [0, 1], intersecting never grows a mask, empty inputs work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pixelvote.consensus import REASONS, ConsensusConfig, apply_consensus, fuse_margins, member_thresholds
from pixelvote.evaluate import metrics as M
from pixelvote.explain.analyze import Analysis

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@st.composite
def analyses(draw, max_members: int = 4, max_batch: int = 3, max_side: int = 6):
    """A hand-built Analysis: M members' maps in [0, 1] over B images, their probabilities and MC stats."""
    m = draw(st.integers(1, max_members))
    b = draw(st.integers(1, max_batch))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    k = draw(st.integers(2, 3))
    maps = torch.from_numpy(draw(arrays(np.float32, (m, b, h, w), elements=unit)))
    if draw(st.booleans()):  # normalised CAMs: each map's maximum is 1 (or the map is all zero)
        top = maps.flatten(2).amax(-1).clamp_min(1e-6).view(m, b, 1, 1)
        maps = torch.where(top > 1e-6, maps / top, maps).clamp(0, 1)
    probs = torch.from_numpy(draw(arrays(np.float32, (m, b, k), elements=st.floats(0.015625, 1.0, width=32))))
    probs = probs / probs.sum(-1, keepdim=True)
    unc = torch.from_numpy(draw(arrays(np.float32, (m, b, h, w), elements=st.floats(0.0, 2.0, width=32))))
    stats = [
        {
            "mean": probs[i],
            "label": probs[i].argmax(-1),
            "entropy": torch.from_numpy(draw(arrays(np.float32, (b,), elements=st.floats(0, 2, width=32)))),
            "mutual_information": torch.from_numpy(
                draw(arrays(np.float32, (b,), elements=st.floats(0, 1, width=32)))
            ),
            "variance": torch.from_numpy(draw(arrays(np.float32, (b,), elements=st.floats(0, 1, width=32)))),
        }
        for i in range(m)
    ]
    ens = probs.mean(0)
    raw_max = maps.flatten(2).amax(-1) * draw(st.sampled_from([0.0, 1.0, 3.5]))
    return Analysis(
        [f"m{i}" for i in range(m)], probs, stats, ens, ens.argmax(-1), ens.argmax(-1), maps, unc, raw_max
    ), k


configs = st.builds(
    ConsensusConfig,
    policy=st.sampled_from(["unanimous", "majority", "k-of-n"]),
    k=st.integers(1, 5),
    fusion=st.sampled_from(["intersection", "mean", "vote"]),
    threshold_method=st.sampled_from(["fixed", "otsu", "percentile"]),
    threshold=st.floats(0.01, 0.99),
    percentile=st.floats(1.0, 99.0),
    mi_threshold=st.one_of(st.none(), st.floats(0.0, 1.0)),
    variance_threshold=st.one_of(st.none(), st.floats(0.0, 1.0)),
    min_confidence=st.floats(0.0, 1.0),
)


# --------------------------------------------------------------------------- consensus


@SETTINGS
@given(analyses(), configs, st.data())
def test_consensus_outputs_stay_in_range(ak, cfg, data):
    a, k = ak
    bg = data.draw(st.integers(0, k - 1))
    r = apply_consensus(a, cfg, bg)
    m, b, h, w = a.maps.shape
    assert r.margin.shape == r.heat.shape == r.uncertainty.shape == (b, h, w)
    assert torch.isfinite(r.margin).all() and torch.isfinite(r.heat).all()
    assert (r.heat >= 0).all() and (r.heat <= 1 + 1e-6).all()
    assert (r.uncertainty >= 0).all()
    assert r.agree.shape == (m, b) and r.agree.dtype == torch.bool
    assert (
        torch.allclose(r.agreement, r.agree.float().mean(0))
        and ((0 <= r.agreement) & (r.agreement <= 1)).all()
    )
    assert r.thresholds.shape == (m, b) and torch.isfinite(r.thresholds).all()
    assert ((r.thresholds >= 0) & (r.thresholds <= 1)).all()
    for j in range(b):
        reasons = r.reasons[j]
        assert set(reasons) <= set(REASONS) and len(reasons) == len(set(reasons))
        if int(a.label[j]) == bg:  # a background diagnosis: empty mask, never "empty_mask"
            assert not r.mask[j].any() and "empty_mask" not in reasons
        else:
            assert ("empty_mask" in reasons) == (not bool(r.mask[j].any()))


@SETTINGS
@given(analyses(), st.floats(0.01, 0.99), st.sampled_from(["fixed", "otsu", "percentile"]))
def test_intersection_mask_lies_inside_every_agreeing_members_mask(ak, threshold, method):
    a, _ = ak
    cfg = ConsensusConfig(fusion="intersection", threshold=threshold, threshold_method=method)
    bg = a.probs.shape[-1] - 1
    r = apply_consensus(a, cfg, bg)
    own = a.maps > r.thresholds[..., None, None]  # each member's binarised map
    for j in range(a.maps.shape[1]):
        for i in range(a.maps.shape[0]):
            if r.agree[i, j]:
                assert not (r.mask[j] & ~own[i, j]).any()  # intersection never grows a mask
                if a.raw_max[i, j] <= 0:
                    assert not r.mask[j].any()  # a member with no evidence vetoes every pixel


@SETTINGS
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
        elements=st.floats(-1, 1, width=32),
    ),
    st.data(),
)
def test_fusion_rules_against_pixel_counts(margins_np, data):
    margins = torch.from_numpy(margins_np)
    m, b = margins.shape[:2]
    agree = torch.from_numpy(data.draw(arrays(np.bool_, (m, b))))
    k = data.draw(st.integers(1, m + 1))
    pos = (margins > 0) & agree[..., None, None]
    n = agree.sum(0).view(b, 1, 1)
    inter = fuse_margins(margins, agree, "intersection", 1) > 0
    vote = fuse_margins(margins, agree, "vote", k) > 0
    none = (n == 0).expand_as(inter)
    assert torch.equal(inter, (pos.sum(0) == n) & ~none)  # every agreeing member says yes
    assert torch.equal(vote, (pos.sum(0) >= torch.clamp(n, max=k).clamp_min(1)) & ~none)
    assert not (inter & ~vote).any()  # the intersection is the strictest vote
    # adding an agreeing member never grows the intersection
    extra = agree.clone()
    extra[data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, b - 1))] = True
    grown = fuse_margins(margins, extra, "intersection", 1) > 0
    kept = (agree.sum(0) > 0).view(b, 1, 1)
    assert not (grown & ~inter & kept).any()


@SETTINGS
@given(analyses(), st.floats(0.01, 0.98), st.floats(0.001, 0.5))
def test_a_higher_fixed_threshold_never_grows_the_mask(ak, t, dt):
    a, _ = ak
    bg = a.probs.shape[-1] - 1
    low = apply_consensus(a, ConsensusConfig(threshold=t), bg).mask
    high = apply_consensus(a, ConsensusConfig(threshold=min(t + dt, 0.99)), bg).mask
    assert not (high & ~low).any()


@pytest.mark.parametrize("method", ["fixed", "otsu", "percentile"])
def test_consensus_on_no_images_and_single_pixels(method):
    cfg = ConsensusConfig(threshold_method=method)
    one = Analysis(
        ["a"],
        torch.full((1, 1, 2), 0.5),
        [
            {
                "mean": torch.tensor([[0.7, 0.3]]),
                "label": torch.tensor([0]),
                "entropy": torch.zeros(1),
                "mutual_information": torch.zeros(1),
                "variance": torch.zeros(1),
            }
        ],
        torch.tensor([[0.7, 0.3]]),
        torch.tensor([0]),
        torch.tensor([0]),
        torch.ones(1, 1, 1, 1),
        torch.zeros(1, 1, 1, 1),
        torch.ones(1, 1),
    )
    r = apply_consensus(one, cfg, 1)
    assert r.margin.shape == (1, 1, 1) and torch.isfinite(r.margin).all()
    maps = torch.zeros(1, 1, 3, 3)  # a flat, all-zero map: no evidence, empty mask, flagged
    flat = Analysis(
        ["a"],
        torch.full((1, 1, 2), 0.5),
        one.stats,
        torch.tensor([[0.7, 0.3]]),
        torch.tensor([0]),
        torch.tensor([0]),
        maps,
        maps.clone(),
        torch.zeros(1, 1),
    )
    r = apply_consensus(flat, cfg, 1)
    assert not r.mask.any() and r.reasons == [["empty_mask"]]


@pytest.mark.parametrize(
    "method",
    [
        "fixed",
        "otsu",
        "percentile",
    ],
)
def test_consensus_on_an_empty_batch(method):
    empty = Analysis(
        ["a", "b"],
        torch.zeros(2, 0, 2),
        [
            {
                "mean": torch.zeros(0, 2),
                "label": torch.zeros(0).long(),
                "entropy": torch.zeros(0),
                "mutual_information": torch.zeros(0),
                "variance": torch.zeros(0),
            }
        ]
        * 2,
        torch.zeros(0, 2),
        torch.zeros(0).long(),
        torch.zeros(0).long(),
        torch.zeros(2, 0, 4, 4),
        torch.zeros(2, 0, 4, 4),
        torch.zeros(2, 0),
    )
    r = apply_consensus(empty, ConsensusConfig(threshold_method=method), 1)
    assert r.margin.shape == (0, 4, 4) and r.reasons == []
    assert member_thresholds(torch.zeros(2, 0, 4, 4), ConsensusConfig(threshold_method=method)).shape == (
        2,
        0,
    )


# --------------------------------------------------------------------------- metrics


def mask_batches(max_n: int = 4, max_side: int = 8):
    return st.tuples(st.integers(0, max_n), st.integers(1, max_side), st.integers(1, max_side)).flatmap(
        lambda s: st.tuples(arrays(np.bool_, s), arrays(np.bool_, s))
    )


@SETTINGS
@given(mask_batches(), st.sampled_from([1.0, 0.0, math.nan]))
def test_iou_and_dice_are_symmetric_bounded_and_consistent(pair, empty_score):
    p, t = pair
    iou = M.mask_iou(p, t, empty_score=empty_score)
    dice = M.mask_dice(p, t, empty_score=empty_score)
    assert iou.shape == dice.shape == (p.shape[0],)
    assert torch.equal(iou.isnan(), M.mask_iou(t, p, empty_score=empty_score).isnan())
    assert torch.equal(
        torch.nan_to_num(iou, 7.0), torch.nan_to_num(M.mask_iou(t, p, empty_score=empty_score), 7.0)
    )
    ok = ~iou.isnan()
    assert ((iou[ok] >= 0) & (iou[ok] <= 1)).all() and ((dice[ok] >= 0) & (dice[ok] <= 1)).all()
    assert (iou[ok] <= dice[ok] + 1e-12).all()
    for j in range(p.shape[0]):  # the batch gives each image's own score
        one = M.mask_iou(p[j], t[j], empty_score=empty_score).item()
        assert (math.isnan(one) and math.isnan(iou[j].item())) or one == iou[j].item()
        if p[j].any() or t[j].any():
            assert M.mask_iou(p[j], p[j]).item() == 1.0
            assert M.mask_iou(p[j], ~p[j]).item() == 0.0
        else:  # both empty
            assert math.isnan(iou[j].item()) if math.isnan(empty_score) else iou[j].item() == empty_score


@SETTINGS
@given(mask_batches(), st.data())
def test_intersection_never_grows_a_mask_and_stats_merge_exactly(pair, data):
    p, t = pair
    both = p & t
    assert (both.sum(axis=(1, 2)) <= np.minimum(p.sum(axis=(1, 2)), t.sum(axis=(1, 2)))).all()
    # shrinking the prediction to its overlap with the truth never lowers IoU
    assert (M.mask_iou(both, t) >= M.mask_iou(p, t) - 1e-12).all()
    whole = M.PixelStats().update(p, t)
    cut = data.draw(st.integers(0, p.shape[0]))
    parts = M.PixelStats().update(p[:cut], t[:cut]) + M.PixelStats().update(p[cut:], t[cut:])
    assert parts == whole
    res = whole.compute()
    if p.shape[0] == 0:
        assert math.isnan(res["mean_iou"]) and math.isnan(res["pooled_iou"])
    else:
        assert 0 <= res["mean_iou"] <= 1 and 0 <= res["pooled_iou"] <= 1
        assert res["mean_iou"] == pytest.approx(float(M.mask_iou(p, t).mean()))


@SETTINGS
@given(
    st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)).flatmap(
        lambda s: st.tuples(arrays(np.float64, s, elements=st.floats(0, 1)), arrays(np.bool_, s))
    )
)
def test_iou_sweep_matches_thresholding_each_map(pair):
    soft, target = pair
    th = [0.0, 0.25, 0.5, 0.75, 1.0]
    sweep = M.iou_sweep(soft, target, th)
    assert sweep.shape == (soft.shape[0], len(th)) and ((sweep >= 0) & (sweep <= 1)).all()
    for i, t in enumerate(th):
        assert torch.allclose(sweep[:, i], M.mask_iou(soft >= t, target))


def test_iou_sweep_and_sweep_stats_on_an_empty_batch():
    assert M.iou_sweep(np.zeros((0, 3, 3)), np.zeros((0, 3, 3), bool)).shape[0] == 0
    s = M.SweepStats().update(np.zeros((0, 3, 3)), np.zeros((0, 3, 3), bool))
    assert s.images == 0 and s.compute()["best_threshold"] is None


# --------------------------------------------------------------------------- output keys


names = st.lists(
    st.tuples(
        st.sampled_from(["", "a", "b", "a/c"]),
        st.text("xy. é", min_size=1, max_size=4).filter(lambda s: not s.startswith(".")),
        st.sampled_from([".png", ".jpg", ".png.png", ".PNG"]),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda t: (t[0], t[1] + t[2]),
)


@settings(max_examples=40, deadline=None)
@given(names)
def test_output_keys_are_unique_safe_and_stable(files):
    import tempfile
    from pathlib import Path

    from pixelvote.engine.inputs import list_inputs

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for folder, stem, ext in files:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / (stem + ext)).write_bytes(b"")  # only names matter here
        items = list_inputs(root)
        keys = [it.key for it in items]
        assert len(items) == len(files) and len(set(keys)) == len(keys)  # no output overwrites another
        for k in keys:
            assert k and not k.startswith("/") and not any(p in ("", ".", "..") for p in k.split("/"))
        assert [it.key for it in list_inputs(root)] == keys
