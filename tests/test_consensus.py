from __future__ import annotations

import torch

from pixelvote.consensus import ConsensusConfig, apply_consensus, fuse_margins, otsu_threshold, policy_met
from pixelvote.explain.analyze import Analysis


def _analysis(maps, member_probs, unc=None):
    """maps (M, B, H, W); member_probs (M, B, K) used for every MC sample."""
    maps = torch.as_tensor(maps, dtype=torch.float32)
    probs = torch.as_tensor(member_probs, dtype=torch.float32)
    M, B = maps.shape[:2]
    stats = [{"mean": probs[m], "label": probs[m].argmax(-1), "entropy": torch.zeros(B),
              "mutual_information": torch.zeros(B), "variance": torch.zeros(B)} for m in range(M)]
    ens = probs.mean(0)
    return Analysis([f"m{i}" for i in range(M)], probs, stats, ens, ens.argmax(-1), ens.argmax(-1), maps,
                    torch.zeros_like(maps) if unc is None else unc, maps.flatten(2).amax(-1))


A = [[0.9, 0.9, 0.1], [0.9, 0.2, 0.1]]
B_ = [[0.9, 0.9, 0.9], [0.1, 0.1, 0.1]]
C = [[0.1, 0.9, 0.6], [0.1, 0.6, 0.1]]
LESION = [0.9, 0.1]  # class 0 = lesion, class 1 = normal (background)


def test_intersection_of_agreeing_members():
    a = _analysis([[A], [B_], [C]], [[LESION]] * 3)
    r = apply_consensus(a, ConsensusConfig(threshold=0.5), background_index=1)
    assert r.mask[0].int().tolist() == [[0, 1, 0], [0, 0, 0]]
    assert r.reasons == [[]] and float(r.agreement[0]) == 1.0


def test_disagreeing_member_is_left_out_and_flagged():
    a = _analysis([[A], [B_], [C]], [[LESION], [LESION], [[0.2, 0.8]]])
    r = apply_consensus(a, ConsensusConfig(threshold=0.5), background_index=1)
    assert r.mask[0].int().tolist() == [[1, 1, 0], [0, 0, 0]]  # A and B only
    assert r.reasons[0] == ["disagreement"]
    assert apply_consensus(a, ConsensusConfig(policy="majority"), 1).reasons[0] == []
    assert abs(float(r.agreement[0]) - 2 / 3) < 1e-6


def test_mean_and_vote_fusion():
    a = _analysis([[A], [B_], [C]], [[LESION]] * 3)
    mean = apply_consensus(a, ConsensusConfig(fusion="mean", threshold=0.5), 1).mask[0].int().tolist()
    # column means: row0 = (0.633, 0.9, 0.533), row1 = (0.367, 0.3, 0.1)
    assert mean == [[1, 1, 1], [0, 0, 0]]
    vote = apply_consensus(a, ConsensusConfig(fusion="vote", threshold=0.5), 1).mask[0].int().tolist()
    # at least 2 of 3 above 0.5: row0 col0 (A,B), col1 (all), col2 (B,C); row1 col1 (C only) -> no
    assert vote == [[1, 1, 1], [0, 0, 0]]
    strict = apply_consensus(a, ConsensusConfig(fusion="vote", policy="k-of-n", k=3, threshold=0.5), 1)
    assert strict.mask[0].int().tolist() == [[0, 1, 0], [0, 0, 0]]


def test_background_diagnosis_gives_empty_mask_and_low_confidence_flag():
    a = _analysis([[A], [B_]], [[[0.3, 0.7]], [[0.45, 0.55]]])
    r = apply_consensus(a, ConsensusConfig(threshold=0.5, min_confidence=0.7), 1)
    assert not r.mask.any()
    assert r.reasons[0] == ["low_confidence"]  # no empty_mask flag for a background diagnosis


def test_empty_mask_for_a_finding_is_flagged():
    a = _analysis([[[[0.9, 0.1]]], [[[0.1, 0.9]]]], [[LESION]] * 2)
    r = apply_consensus(a, ConsensusConfig(threshold=0.5), 1)
    assert not r.mask.any() and "empty_mask" in r.reasons[0]


def test_mi_and_variance_thresholds_flag():
    a = _analysis([[A]], [[LESION]])
    a.stats[0]["mutual_information"] = torch.tensor([0.2])
    a.stats[0]["variance"] = torch.tensor([0.01])
    r = apply_consensus(a, ConsensusConfig(mi_threshold=0.1, variance_threshold=0.001), 1)
    assert r.reasons[0] == ["high_mutual_information", "high_variance"]


def test_otsu_splits_a_bimodal_map():
    m = torch.tensor([0.1] * 50 + [0.8] * 50).view(1, 10, 10)
    t = float(otsu_threshold(m))
    assert 0.1 <= t < 0.8
    r = apply_consensus(_analysis(m.view(1, 1, 10, 10), [[LESION]]), ConsensusConfig(threshold_method="otsu"),
                        1)
    assert int(r.mask.sum()) == 50


def test_percentile_threshold_keeps_the_top_share():
    m = torch.linspace(0, 1, 100).view(1, 1, 10, 10)
    r = apply_consensus(_analysis(m, [[LESION]]),
                        ConsensusConfig(threshold_method="percentile", percentile=80), 1)
    assert 19 <= int(r.mask.sum()) <= 20


def test_fusion_with_no_agreeing_member_is_empty():
    margins = torch.ones(2, 1, 2, 2)
    agree = torch.zeros(2, 1, dtype=torch.bool)
    assert (fuse_margins(margins, agree, "intersection", 1) <= 0).all()
    assert policy_met(torch.tensor([[True], [False], [True]]), ConsensusConfig(policy="k-of-n", k=2)).item()


def test_given_label_fuses_every_members_map_even_when_none_agrees():
    # every member calls the image background (class 1), but its label says lesion (class 0)
    a = _analysis([[A], [B_], [C]], [[[0.2, 0.8]]] * 3)
    assert not apply_consensus(a, ConsensusConfig(threshold=0.5), 1).mask.any()  # diagnosis decides: no mask
    a.given = torch.tensor([0])
    r = apply_consensus(a, ConsensusConfig(threshold=0.5), 1)
    assert r.mask[0].int().tolist() == [[0, 1, 0], [0, 0, 0]]  # the intersection of all three maps
    assert bool(r.foreground[0])
    assert "label_disagrees" in r.reasons[0]
    mean = apply_consensus(a, ConsensusConfig(fusion="mean", threshold=0.5), 1)
    assert mean.mask[0].int().tolist() == [[1, 1, 1], [0, 0, 0]]


def test_given_background_label_gives_no_mask_and_an_agreeing_label_no_flag():
    a = _analysis([[A], [B_], [C]], [[LESION]] * 3)
    a.given = torch.tensor([1])  # labelled background although every member sees a lesion
    r = apply_consensus(a, ConsensusConfig(threshold=0.5), 1)
    assert not r.mask.any() and not bool(r.foreground[0])
    assert r.reasons[0] == ["label_disagrees"]
    a.given = torch.tensor([0])
    r = apply_consensus(a, ConsensusConfig(threshold=0.5), 1)
    assert r.reasons == [[]] and r.mask[0].int().tolist() == [[0, 1, 0], [0, 0, 0]]


def test_labelled_members_agreeing_fuses_the_agreeing_members_where_the_finding_is_seen():
    # two members see the lesion, one calls it background; a second image all three call background
    a = _analysis([[A, A], [B_, B_], [C, C]], [[LESION, [0.2, 0.8]], [LESION, [0.2, 0.8]],
                                               [[0.2, 0.8], [0.2, 0.8]]])
    a.given = torch.tensor([0, 0])
    every = apply_consensus(a, ConsensusConfig(threshold=0.5), 1)
    agreeing = apply_consensus(a, ConsensusConfig(threshold=0.5, labelled_members="agreeing"), 1)
    assert every.mask[0].int().tolist() == [[0, 1, 0], [0, 0, 0]]  # A, B and C intersected
    assert agreeing.mask[0].int().tolist() == [[1, 1, 0], [0, 0, 0]]  # A and B only
    # where the ensemble misses the finding, every member fuses either way
    assert agreeing.mask[1].int().tolist() == every.mask[1].int().tolist() == [[0, 1, 0], [0, 0, 0]]
