"""From members' maps to one mask and a review decision: agreement, binarisation, fusion, flags.

Maps are normalised CAMs in [0, 1]. Fusion produces a *margin* map whose positive part is the mask
(``map - threshold`` for one member; min over members for the intersection; k-th largest for k-of-n votes;
mean map minus threshold for ``mean``), so the mask can be resized smoothly to any size and thresholded at 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pixelvote.errors import ConfigError
from pixelvote.explain.analyze import Analysis
from pixelvote.refine.colour import ColourPrior, with_colour
from pixelvote.refine.crf import CRFConfig
from pixelvote.refine.tone import SIGMA, Tone, with_tone

Policy = Literal["unanimous", "majority", "k-of-n"]
Fusion = Literal["intersection", "mean", "vote"]
ThresholdMethod = Literal["fixed", "otsu", "percentile"]
Refine = Literal["none", "crf"]

REASONS = ("disagreement", "high_mutual_information", "high_variance", "low_confidence", "empty_mask",
           "no_agreeing_member", "label_disagrees")


class ConsensusConfig(BaseModel):
    """How members' maps become a mask, and when an image goes to a human."""

    model_config = ConfigDict(extra="forbid")

    policy: Policy = "unanimous"
    k: int = Field(2, ge=1, description="members that must agree (policy k-of-n) / vote for a pixel "
                                        "(fusion vote)")
    fusion: Fusion = "intersection"
    threshold_method: ThresholdMethod = "fixed"
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of each map's maximum (fixed)")
    percentile: float = Field(90.0, gt=0.0, lt=100.0, description="pixels above this percentile (percentile)")
    threshold_source: str = "default (0.5 of the max)"
    mi_threshold: float | None = Field(None, ge=0.0, description="flag when mean mutual information is above")
    variance_threshold: float | None = Field(None, ge=0.0, description="flag when mean MC variance is above")
    min_confidence: float = Field(0.6, ge=0.0, le=1.0,
                                  description="flag when the ensemble probability is below")
    labelled_members: Literal["all", "agreeing"] = Field(
        "all", description="with known labels (annotate --labels): fuse every member's map, or, where the "
                           "ensemble diagnoses a finding, only the members that agree with it")
    refine: Refine = Field("none", description="crf: refine the fused soft map with a dense CRF on the image "
                                               "colours, then threshold the CRF's marginal (needs "
                                               "pydensecrf2)")
    crf: CRFConfig = Field(default_factory=CRFConfig)
    colour_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="combine the fused map with the run's colour prior (P(finding | "
                                         "colour), learned from the training images' labels) as map^(1-w) * "
                                         "prior^w before it is thresholded or refined; 0: the map alone")
    colour_prior: ColourPrior | None = Field(None, description="the run's colour prior (learned by `train`)")
    tone_weight: float = Field(
        0.0, ge=0.0, lt=1.0, description="combine the fused map with the tone map (how much darker or "
                                         "brighter than its surroundings each pixel is, see `tone`) as "
                                         "map^(1-w) * tone^w, after the colour prior; 0: leave it out")
    tone: Tone | None = Field(None, description="whether findings are darker or brighter than their "
                                                "surroundings (learned by `train` from the labels)")
    tone_sigma: float = Field(SIGMA, gt=0.0, le=1.0, description="the surroundings' Gaussian blur, as a "
                                                                "fraction of the map's size")

    @model_validator(mode="after")
    def _prior_for_weight(self) -> ConsensusConfig:
        if self.colour_weight > 0 and self.colour_prior is None:
            raise ValueError(f"colour_weight is {self.colour_weight:g} but there is no colour_prior (set "
                             "colour_weight to 0, or re-run `pixelvote train`, which learns the prior)")
        if self.tone_weight > 0 and self.tone is None:
            raise ValueError(f"tone_weight is {self.tone_weight:g} but tone is not set (set tone_weight to "
                             "0, or tone to \"dark\" or \"bright\")")
        return self

    @property
    def soft_fused(self) -> bool:
        """Whether masks come from the fused soft map thresholded as a whole (the CRF, the colour prior,
        the tone map) rather than from each member's map thresholded on its own."""
        return self.refine == "crf" or self.colour_weight > 0 or self.tone_weight > 0


@dataclass
class ConsensusResult:
    margin: torch.Tensor  # (B, S, S) mask = margin > 0
    heat: torch.Tensor  # (B, S, S) mean normalised map of agreeing members, for display
    uncertainty: torch.Tensor  # (B, S, S) mean MC-CAM std of agreeing members
    agree: torch.Tensor  # (M, B) bool, member agrees with the diagnosis
    agreement: torch.Tensor  # (B,) share of members that agree
    foreground: torch.Tensor  # (B,) bool, the image's class (given, else the diagnosis) is not background
    reasons: list[list[str]]
    thresholds: torch.Tensor  # (M, B) threshold applied to each member's map

    @property
    def mask(self) -> torch.Tensor:
        return self.margin > 0


def otsu_threshold(maps: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each map ``(..., H, W)`` in [0, 1] -> ``(...)``."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).clamp(0, 1)
    idx = (flat * (bins - 1)).round().long()
    hist = torch.zeros(flat.shape[0], bins, device=maps.device).scatter_add_(1, idx, torch.ones_like(flat))
    p = hist / hist.sum(1, keepdim=True)
    centers = torch.linspace(0, 1, bins, device=maps.device)
    w0 = p.cumsum(1)
    mu = (p * centers).cumsum(1)
    mu_t = mu[:, -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    t = centers[between.argmax(1)]
    return t.reshape(lead)


def member_thresholds(maps: torch.Tensor, cfg: ConsensusConfig) -> torch.Tensor:
    """Per member and image thresholds ``(M, B)`` for maps ``(M, B, H, W)``."""
    if cfg.threshold_method == "fixed":
        return torch.full(maps.shape[:2], cfg.threshold, device=maps.device)
    if cfg.threshold_method == "otsu":
        return otsu_threshold(maps)
    flat = maps.reshape(*maps.shape[:2], maps.shape[-2] * maps.shape[-1])
    if flat.numel() == 0:
        return torch.zeros(maps.shape[:2], device=maps.device)
    if flat.shape[-1] > 65536:  # torch.quantile's size limit; a strided sample is plenty
        flat = flat[..., :: math.ceil(flat.shape[-1] / 65536)]
    return torch.quantile(flat, cfg.percentile / 100.0, dim=-1)


def agreeing_members(member_labels: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return member_labels == label.unsqueeze(0)


def policy_met(agree: torch.Tensor, cfg: ConsensusConfig) -> torch.Tensor:
    n_agree = agree.sum(0)
    M = agree.shape[0]
    if cfg.policy == "unanimous":
        return n_agree == M
    if cfg.policy == "majority":
        return n_agree * 2 > M
    return n_agree >= min(cfg.k, M)


def fuse_margins(margins: torch.Tensor, agree: torch.Tensor, fusion: Fusion, k: int,
                 maps: torch.Tensor | None = None, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Fuse per-member margins ``(M, B, H, W)`` over the agreeing members ``(M, B)`` -> ``(B, H, W)``."""
    a = agree.view(*agree.shape, 1, 1)
    big = torch.finfo(margins.dtype).max
    if fusion == "intersection":
        fused = torch.where(a, margins, torch.full_like(margins, big)).amin(0)
    elif fusion == "vote":
        ranked = torch.where(a, margins, torch.full_like(margins, -big)).sort(0, descending=True).values
        n = agree.sum(0)  # (B,)
        kk = torch.minimum(torch.full_like(n, k), n).clamp_min(1) - 1
        fused = ranked.gather(0, kk.view(1, -1, 1, 1).expand(1, *ranked.shape[1:])).squeeze(0)
    else:  # mean of maps minus mean threshold
        assert maps is not None and thresholds is not None
        w = a.float()
        cnt = w.sum(0).clamp_min(1.0)
        fused = (maps * w).sum(0) / cnt - (thresholds * agree.float()).sum(0).view(-1, 1, 1) / cnt
    none = agree.sum(0) == 0
    return torch.where(none.view(-1, 1, 1), torch.full_like(fused, -1.0), fused)


def apply_consensus(analysis: Analysis, cfg: ConsensusConfig, background_index: int) -> ConsensusResult:
    """The mask, display maps and review flags of a batch. Without known labels (``analysis.given`` None) the
    members that agree with the ensemble's diagnosis are fused and a background diagnosis gets no mask. With
    known labels the label decides: an image labelled with a finding gets a mask fused from every member's
    map (a member that misses the finding still shows where it is; which class the maps explain is
    :func:`pixelvote.explain.analyze.analyze`'s choice), or with ``labelled_members="agreeing"`` from the
    agreeing members' where the ensemble diagnoses a finding; a background-labelled image gets none, and
    ``label_disagrees`` flags an image whose diagnosis differs from its label."""
    maps = analysis.maps
    label = analysis.label
    agree, fuse, k, foreground = _fusion_plan(analysis, cfg, background_index)
    decided = label if analysis.given is None else analysis.given
    if cfg.soft_fused:
        fused, thresholds = SoftMargins(analysis, cfg, fuse, k, foreground).at(cfg)
    else:
        thresholds = member_thresholds(maps, cfg)
        margins = maps - thresholds.view(*thresholds.shape, 1, 1)
        # members with no positive evidence at all (raw CAM max 0) have nothing to contribute
        live = (analysis.raw_max > 0).view(*agree.shape, 1, 1)
        margins = torch.where(live, margins, torch.full_like(margins, -1.0))
        fused = fuse_margins(margins, fuse, cfg.fusion, k, maps, thresholds)
    fused = torch.where(foreground.view(-1, 1, 1), fused, torch.full_like(fused, -1.0))
    w = fuse.float().view(*agree.shape, 1, 1)
    cnt = w.sum(0).clamp_min(1.0)
    heat = (maps * w).sum(0) / cnt
    unc = (analysis.uncertainty * w).sum(0) / cnt

    mi = torch.stack([s["mutual_information"] for s in analysis.stats]).mean(0)
    var = torch.stack([s["variance"] for s in analysis.stats]).mean(0)
    conf = analysis.ensemble_probs.gather(1, label.view(-1, 1)).squeeze(1)
    ok = policy_met(agree, cfg)
    empty = foreground & ((fused > 0).flatten(1).sum(1) == 0)
    none = agree.sum(0) == 0
    nan = torch.full_like(mi, float("nan"))
    checks = torch.stack([
        none,
        ~none & ~ok,
        mi > (cfg.mi_threshold if cfg.mi_threshold is not None else nan),
        var > (cfg.variance_threshold if cfg.variance_threshold is not None else nan),
        conf < cfg.min_confidence,
        empty,
        decided != label,
    ], 1).tolist()  # one transfer from the device for the whole batch
    names = ("no_agreeing_member", "disagreement", "high_mutual_information", "high_variance",
             "low_confidence", "empty_mask", "label_disagrees")
    reasons = [[n for n, hit in zip(names, row, strict=True) if hit] for row in checks]
    return ConsensusResult(fused, heat, unc, agree, agree.float().mean(0), foreground, reasons, thresholds)


def _fusion_plan(analysis: Analysis, cfg: ConsensusConfig, background_index: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(the members that agree with the diagnosis ``(M, B)``, the members whose maps are fused ``(M, B)``,
    the k of a vote, the images that get a mask ``(B,)``): see :func:`apply_consensus`."""
    member_labels = torch.stack([s["label"] for s in analysis.stats])
    label = analysis.label
    agree = agreeing_members(member_labels, label)
    fuse = agree
    if analysis.given is not None:
        fuse = torch.ones_like(agree)
        if cfg.labelled_members == "agreeing":  # where the ensemble sees a finding, its agreeing members
            seen = (label != background_index) & agree.any(0)
            fuse = torch.where(seen.unsqueeze(0), agree, fuse)
    decided = label if analysis.given is None else analysis.given
    k = cfg.k if cfg.fusion == "vote" else 1
    if cfg.fusion == "vote" and cfg.policy != "k-of-n":
        k = max(1, math.ceil((analysis.maps.shape[0] + 1) / 2))
    return agree, fuse, k, decided != background_index


HELD = 4  # CRF starting points and results a SoftMargins keeps (calibration asks for one threshold in a row)


class SoftMargins:
    """The fusion of one batch thresholded as one soft map (``cfg.soft_fused``) at any threshold: the fused
    soft map (the fusion at threshold 0, combined with the colour prior where ``cfg.colour_weight`` > 0 and
    the tone map where ``cfg.tone_weight`` > 0) and
    the images' colours at the CRF's size are made once, for every threshold (calibration scores a dozen).
    At a threshold (fixed, or Otsu/percentile of the fused map) the margin is the map minus the threshold,
    or, with the dense CRF, the map is the unary, undecided at the threshold, and the margin is the CRF's
    object probability minus its cutoff (``cfg.crf.cutoff``, 0.5 unless calibration chose another). Only
    images with a foreground diagnosis and an agreeing member are refined (the others get no mask anyway)."""

    def __init__(self, analysis: Analysis, cfg: ConsensusConfig, fuse: torch.Tensor, k: int,
                 foreground: torch.Tensor) -> None:
        from pixelvote.refine.crf import crf_colours

        if analysis.inputs is None:
            raise ConfigError("the CRF refinement and the colour and tone priors need the analysed images",
                              fix="use analyze(), which keeps them")
        if cfg.colour_weight > 0 and cfg.colour_prior is None:
            raise ConfigError(f"consensus.colour_weight is {cfg.colour_weight:g} but the run has no colour "
                              "prior", fix="set consensus.colour_weight to 0 in run.json, or re-run "
                                           "`pixelvote train`, which learns the prior")
        if cfg.tone_weight > 0 and cfg.tone is None:
            raise ConfigError(f"consensus.tone_weight is {cfg.tone_weight:g} but consensus.tone is not set",
                              fix="set consensus.tone_weight to 0 in run.json, or re-run `pixelvote train`, "
                                  "which learns the tone")
        maps = analysis.maps
        live = (analysis.raw_max > 0).view(*fuse.shape, 1, 1)
        zero = torch.zeros(maps.shape[:2], device=maps.device)
        soft = fuse_margins(torch.where(live, maps, torch.full_like(maps, -1.0)), fuse, cfg.fusion, k, maps,
                            zero).clamp(0.0, 1.0)
        if cfg.colour_prior is not None and cfg.colour_weight > 0:
            soft = with_colour(soft, analysis.inputs, cfg.colour_prior, cfg.colour_weight)
        if cfg.tone is not None and cfg.tone_weight > 0:
            soft = with_tone(soft, analysis.inputs, cfg.tone, cfg.tone_weight, cfg.tone_sigma)
        self.soft = soft
        self.fusion = _fusion_settings(cfg)
        self.refined = cfg.refine == "crf"
        self.members = maps.shape[0]
        self.none = fuse.sum(0) == 0
        self.foreground = foreground
        self.todo = todo = (foreground & fuse.any(0)).nonzero().flatten()
        hw = self.soft.shape[-2:]
        self.colours = crf_colours(analysis.inputs[todo], hw, cfg.crf) if len(todo) and self.refined else None
        # the last few CRF starting points (by threshold) and results (by threshold and settings but the
        # cutoff): calibration asks for the same threshold with every CRF weight, iteration count and cutoff
        # in a row
        self._unaries: OrderedDict[tuple[object, ...], np.ndarray] = OrderedDict()
        self._results: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()

    def serves(self, cfg: ConsensusConfig) -> bool:
        """Whether :meth:`at` takes ``cfg``: its fusion, colour prior and CRF size are those the maps and
        colours were made with, and it refines as they were made to."""
        return _fusion_settings(cfg) == self.fusion and (cfg.refine == "crf") == self.refined

    def at(self, cfg: ConsensusConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused margin ``(B, H, W)``, thresholds ``(M, B)``) at ``cfg``'s threshold and CRF settings
        (see :meth:`serves`)."""
        if not self.serves(cfg):
            raise ValueError(f"these maps were fused with {self.fusion}{' + crf' * self.refined}, not "
                             f"{_fusion_settings(cfg)}{' + crf' * (cfg.refine == 'crf')}")
        soft = self.soft
        if cfg.threshold_method == "fixed":
            t = torch.full(soft.shape[:1], cfg.threshold, device=soft.device)
        else:
            t = member_thresholds(soft.unsqueeze(0), cfg)[0]
        margin = soft - t.view(-1, 1, 1)
        if len(self.todo) and self.refined:
            margin[self.todo] = self._refine(t[self.todo], cfg.crf) - cfg.crf.cutoff
        return margin.masked_fill_(self.none.view(-1, 1, 1), -1.0), t.unsqueeze(0).expand(self.members, -1)

    def _refine(self, t: torch.Tensor, crf: CRFConfig) -> torch.Tensor:
        """The CRF's object probability for the images to refine at their thresholds ``t``."""
        from pixelvote.refine.crf import crf_unary, dense_crf, keep_newest

        at = t.detach().cpu().numpy().tobytes()
        key = (at, crf.model_dump_json(exclude={"cutoff"}))
        if key not in self._results:
            soft = self.soft[self.todo]
            start = (at, crf.confidence)
            if start not in self._unaries:
                keep_newest(self._unaries, start, crf_unary(soft, t, crf), HELD)
            keep_newest(self._results, key, dense_crf(soft, None, crf, t, colours=self.colours,
                                                      unary=self._unaries[start]), HELD)
        return self._results[key]

    def margin(self, cfg: ConsensusConfig) -> torch.Tensor:
        """:func:`apply_consensus`'s ``margin`` at ``cfg``: the mask is ``> 0``, and none where the image's
        class is the background."""
        fused, _ = self.at(cfg)
        return fused.masked_fill_(~self.foreground.view(-1, 1, 1), -1.0)


def _fusion_settings(cfg: ConsensusConfig) -> tuple[object, ...]:
    """What a :class:`SoftMargins` is made for: the fusion, the colour prior and its weight, the tone and
    its weight, and the CRF's size its colours are at."""
    toned = cfg.tone_weight > 0
    return (cfg.fusion, cfg.k, cfg.policy, cfg.labelled_members, cfg.colour_weight,
            cfg.colour_prior.probability if cfg.colour_prior is not None and cfg.colour_weight > 0 else None,
            cfg.tone_weight, cfg.tone if toned else None, cfg.tone_sigma if toned else None, cfg.crf.size)


def soft_margins(analysis: Analysis, cfg: ConsensusConfig, background_index: int) -> SoftMargins:
    """The fusion of ``analysis`` with ``cfg``'s fusion (and colour prior) as one soft map, ready to be
    scored at many thresholds and CRF settings (``.margin(cfg)``, which equals ``apply_consensus(analysis,
    cfg, ...).margin`` for a ``cfg`` with ``soft_fused``)."""
    _, fuse, k, foreground = _fusion_plan(analysis, cfg, background_index)
    return SoftMargins(analysis, cfg, fuse, k, foreground)
