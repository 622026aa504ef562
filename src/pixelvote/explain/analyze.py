"""Run every member once per image: MC-Dropout statistics from T head samples and XGrad-CAM maps.

The backbone runs once; only the head (dropout + linear) is sampled T times on the pooled features.
Each MC sample's CAM is the XGrad-CAM of that sample's target logit; its gradient at the CAM layer is
``J^T v_t`` with ``J = d pooled / d A`` and ``v_t = w_target * mask_t`` (the dropout mask, scaled), so
all T maps come from one batched vector-Jacobian product - or in closed form when the CAM layer is
the map that is pooled (then ``dy/dA = v_t / (h w)`` everywhere and XGrad-CAM = Grad-CAM = CAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pixelvote.explain.hooks import ActivationCapture
from pixelvote.explain.xgradcam import weighted_map, xgradcam, xgradcam_weights
from pixelvote.models.ensemble import Ensemble
from pixelvote.models.member import Member, mc_dropout
from pixelvote.models.registry import get_spec

if TYPE_CHECKING:
    from pixelvote.explain.evidence import EvidenceRule
    from pixelvote.refine.colour import ColourPrior

_EPS = 1e-8


@dataclass
class MemberOutput:
    """Per-member results for a batch of B images, K classes, T samples, map size (h, w)."""

    probs: torch.Tensor  # (T, B, K) softmax of each MC sample
    pooled: torch.Tensor  # (B, C) pooled features (detached)
    activation: torch.Tensor  # (B, C', h, w) CAM-layer activation (leaf with graph to the logits)
    logits: torch.Tensor  # (B, K) dropout-off logits, with graph to ``activation``
    masks: torch.Tensor  # (T, B, C) scaled dropout masks
    pooled_graph: torch.Tensor  # (B, C) pooled features with graph to ``activation``
    fine: torch.Tensor | None = None  # (B, C'', 2h, 2w) earlier activation, when asked for

    @property
    def mean_probs(self) -> torch.Tensor:
        return self.probs.mean(0)


def sample_dropout_masks(member: Member, shape: tuple[int, int], T: int, device: torch.device,
                         seeds: list[int] | None = None) -> torch.Tensor:
    """T scaled dropout masks ``(T, B, C)``.

    Without ``seeds`` they are drawn by the member's own ``nn.Dropout`` (in MC mode) exactly as T full forward
    passes would draw them, one ``(B, C)`` draw per pass. With one seed per image, each image's masks come
    from its own generator, so results do not depend on which images share a batch (resumed runs match)."""
    if seeds is None:
        ones = torch.ones(shape, device=device)
        with mc_dropout(member):
            return torch.stack([member.dropout(ones) for _ in range(T)])
    keep = 1.0 - member.p
    out = torch.empty(T, shape[0], shape[1])
    for b, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        # uniform draws compared in place: the same Bernoulli(keep) masks at a quarter of bernoulli()'s cost
        out[:, b] = torch.rand((T, shape[1]), generator=g).lt_(keep).div_(keep)
    return out.to(device)


def run_member(member: Member, x: torch.Tensor, T: int, seeds: list[int] | None = None,
               fine_layer: str | None = None) -> MemberOutput:
    """Forward ``x`` ((B,3,H,W) in [0,1]) once; sample the head T times. ``fine_layer`` also records an
    earlier, higher-resolution activation (the graph is then cut there instead)."""
    layers = [member.cam_layer] + ([fine_layer] if fine_layer else [])
    with torch.no_grad(), ActivationCapture(member.backbone, layers) as cap:
        feats = member.features(x)
        pooled = member.pool(feats)
        logits = member.fc(pooled)
    assert cap.activation is not None
    pooled_d = pooled.detach()
    masks = sample_dropout_masks(member, tuple(pooled_d.shape), T, x.device, seeds)
    with torch.no_grad():
        sample_logits = torch.einsum("tbc,kc->tbk", pooled_d.unsqueeze(0) * masks, member.fc.weight)
        probs = torch.softmax(sample_logits + member.fc.bias, dim=-1)
    fine = cap.activations.get(fine_layer) if fine_layer else None
    return MemberOutput(probs, pooled_d, cap.activation, logits, masks, pooled, fine)


def mc_statistics(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """From MC samples ``(T, B, K)``: mean probability, predicted class, predictive entropy, mutual
    information (BALD) and the variance of the predicted class's probability, each ``(B,)`` or ``(B, K)``."""
    mean = probs.mean(0)
    label = mean.argmax(-1)
    entropy = -(mean * (mean + _EPS).log()).sum(-1)
    expected = -(probs * (probs + _EPS).log()).sum(-1).mean(0)
    mi = (entropy - expected).clamp_min(0.0)
    p_label = probs.gather(-1, label.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)
    var = p_label.var(0, unbiased=False) if probs.shape[0] > 1 else torch.zeros_like(entropy)
    return {"mean": mean, "label": label, "entropy": entropy, "mutual_information": mi, "variance": var}


def diagnose(probs: torch.Tensor, background: int, threshold: float | None = None) -> torch.Tensor:
    """Class indices from probabilities ``(..., K)``: the most probable class, or with ``threshold`` the most
    probable finding wherever the probability of any finding, ``1 - P(background)``, exceeds it and the
    background elsewhere (a classifier that has never seen a camera's images may give its findings there
    less probability than the validation split shows they deserve: ``train`` chooses the threshold there)."""
    if threshold is None:
        return probs.argmax(-1)
    return finding_or_background(probs, 1.0 - probs[..., background] > threshold, background)


def finding_or_background(probs: torch.Tensor, finding: torch.Tensor, background: int) -> torch.Tensor:
    """The most probable finding where ``finding`` (bool, ``(...)``) holds, the background elsewhere."""
    return torch.where(finding, most_probable_finding(probs, background),
                       torch.full_like(probs[..., 0], background, dtype=torch.long))


def most_probable_finding(probs: torch.Tensor, background: int) -> torch.Tensor:
    """The most probable class other than the background, from probabilities ``(..., K)``."""
    findings = probs.clone()
    findings[..., background] = -1.0
    return findings.argmax(-1)


def explained_class(probs: torch.Tensor, label: torch.Tensor, background: int) -> torch.Tensor:
    """The class whose CAMs explain each image without known labels: its diagnosis, or for a background
    diagnosis the most probable finding (so a reviewer still sees where the models looked)."""
    return torch.where(label == background, most_probable_finding(probs, background), label)


def _target_score(logits: torch.Tensor, target: torch.Tensor, against: int | None) -> torch.Tensor:
    """The explained score per image: the target's logit, or its margin over class ``against`` (where the
    target is another class)."""
    score = logits.gather(1, target.view(-1, 1)).squeeze(1)
    if against is None:
        return score
    return score - logits[:, against] * (target != against).to(logits.dtype)


def member_cams(member: Member, out: MemberOutput, target: torch.Tensor, *, against: int | None = None,
                chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """XGrad-CAM of ``target`` (B,) without dropout, ``(B, h, w)``, and the std over the T MC samples' CAMs,
    ``(B, h, w)``; both raw (not normalised). With ``against`` (a class index) the explained score is
    ``logit(target) - logit(against)``: what tells the target from that class."""
    A = out.activation
    keep = not member.final_cam_layer or out.fine is not None
    with torch.enable_grad():  # callers may run under no_grad; the graph from A to the logits exists
        cam = xgradcam(A, _target_score(out.logits, target, against), retain_graph=keep)
    Ad = A.detach()
    W = member.fc.weight.detach()
    w_target = W[target]  # (B, C)
    if against is not None:
        w_target = w_target - W[against] * (target != against).to(W.dtype).unsqueeze(1)
    v = out.masks * w_target.unsqueeze(0)  # (T, B, C): d y_t / d pooled
    T = v.shape[0]
    if T < 2 or member.p == 0.0:
        return cam, torch.zeros_like(cam)
    if member.final_cam_layer:
        h, w = Ad.shape[-2:]
        sample_maps = weighted_map(Ad, v / (h * w))
    else:
        parts = []
        for i in range(0, T, chunk):
            vi = v[i:i + chunk]
            last = i + chunk >= T
            with torch.enable_grad():
                (g,) = torch.autograd.grad(out.pooled_graph, A, grad_outputs=vi, is_grads_batched=True,
                                           retain_graph=not last)
            parts.append(weighted_map(Ad, xgradcam_weights(Ad, g)))
        sample_maps = torch.cat(parts)
    return cam, sample_maps.std(0, unbiased=False)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps ``(..., h, w)`` to ``size``."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *size)


def fine_cam(out: MemberOutput, target: torch.Tensor, against: int | None = None) -> torch.Tensor:
    """XGrad-CAM of ``target`` at the earlier layer recorded by ``run_member(..., fine_layer=...)``."""
    assert out.fine is not None
    with torch.enable_grad():
        return xgradcam(out.fine, _target_score(out.logits, target, against), retain_graph=False)


class MapConfig(BaseModel):
    """How each member's saliency map is made, beyond the paper's single XGrad-CAM."""

    model_config = ConfigDict(extra="forbid")

    tta_flip: bool = Field(False, description="average with the map of the horizontally flipped image")
    tta_scales: tuple[float, ...] = Field((1.0,), description="input scales whose maps are averaged")
    layer_fusion: Literal["none", "mean", "geometric"] = Field(
        "none", description="fuse XGrad-CAM of an earlier (2x finer) layer with the last layer's")
    refine: Literal["none", "guided"] = Field("none", description="edge-aware refinement of each map")
    contrast: bool = Field(False, description="explain logit(finding) - logit(background class), the score "
                           "that decides between them, instead of the finding's logit alone")
    guided_radius: float = Field(0.04, gt=0, description="guided filter radius, as a fraction of the size")
    guided_eps: float = Field(0.01, gt=0)

    @property
    def is_plain(self) -> bool:
        return (not self.tta_flip and tuple(self.tta_scales) == (1.0,) and self.layer_fusion == "none"
                and self.refine == "none" and not self.contrast)


@dataclass
class Analysis:
    """Everything the consensus needs for a batch: per member (M) and per image (B), maps at ``size``."""

    member_names: list[str]
    probs: torch.Tensor  # (M, B, K) MC mean probabilities
    stats: list[dict[str, torch.Tensor]]  # per member MC statistics
    ensemble_probs: torch.Tensor  # (B, K)
    label: torch.Tensor  # (B,) ensemble diagnosis
    target: torch.Tensor  # (B,) class whose CAMs were computed
    maps: torch.Tensor  # (M, B, S, S) CAMs normalised by their per-image max, in [0, 1]
    uncertainty: torch.Tensor  # (M, B, S, S) std of MC CAMs on the same scale
    raw_max: torch.Tensor  # (M, B) per-image max of each raw CAM (0 = no evidence)
    inputs: torch.Tensor | None = None  # (B, 3, S, S) the analysed images in [0, 1] (for refinements)
    given: torch.Tensor | None = None  # (B,) the image-level labels, when annotating labelled images
    evidence: torch.Tensor | None = None  # (B,) the colour evidence the diagnosis weighed (runs with a rule)


def analyze(ensemble: Ensemble, images: torch.Tensor, *, mc_samples: int = 30,
            target: torch.Tensor | None = None, seeds: list[int] | None = None,
            maps: MapConfig | None = None, given: torch.Tensor | None = None) -> Analysis:
    """Analyse a batch of images ``(B, 3, S, S)`` (uint8 or [0,1] float) with every member.

    The CAM target is ``target`` when given, else the ensemble's diagnosis, or - for a background diagnosis -
    the most probable non-background class (so a reviewer still sees where the models looked).
    ``given`` holds the images' known labels: an image labelled with a finding that the ensemble diagnoses as
    background is explained for its label instead (the consensus then decides by the label and fuses every
    member's map, see :func:`pixelvote.consensus.apply_consensus`).
    ``maps`` adds test-time augmentation, layer fusion and refinement of the maps; the diagnosis and the
    MC statistics always come from the plain view."""
    cfg = maps or MapConfig()
    x = ensemble.normalize(images)
    base = _analyze_view(ensemble, x, mc_samples, target, seeds, cfg, given=given)
    if cfg.tta_flip or tuple(cfg.tta_scales) != (1.0,):
        size = tuple(x.shape[-2:])
        total_m, total_u, n = base.maps.clone(), base.uncertainty.clone(), 1
        for scale in cfg.tta_scales:
            for flip in (False, True) if cfg.tta_flip else (False,):
                if scale == 1.0 and not flip:
                    continue
                xs = x if scale == 1.0 else F.interpolate(
                    x, size=(_round32(size[0] * scale), _round32(size[1] * scale)), mode="bilinear",
                    antialias=True, align_corners=False)
                xs = xs.flip(-1) if flip else xs
                v = _analyze_view(ensemble, xs, mc_samples, base.target, seeds, cfg, maps_only=True)
                vm, vu = (v.maps.flip(-1), v.uncertainty.flip(-1)) if flip else (v.maps, v.uncertainty)
                total_m += upsample(vm, size)
                total_u += upsample(vu, size)
                n += 1
        base.maps = _renormalise(total_m / n)
        base.uncertainty = total_u / n
    if cfg.refine == "guided":
        from pixelvote.refine.guided import grey, guided_filter

        r = max(1, round(cfg.guided_radius * max(x.shape[-2:])))
        base.maps = _renormalise(guided_filter(base.maps, grey(x), r, cfg.guided_eps).clamp_min(0.0))
    base.inputs = x
    return base


def _round32(v: float) -> int:
    return max(32, int(round(v / 32.0)) * 32)


def _renormalise(maps: torch.Tensor) -> torch.Tensor:
    mx = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    return (maps / mx).clamp_(0.0, 1.0)


def _analyze_view(ensemble: Ensemble, x: torch.Tensor, mc_samples: int, target: torch.Tensor | None,
                  seeds: list[int] | None, cfg: MapConfig, maps_only: bool = False,
                  given: torch.Tensor | None = None) -> Analysis:
    size = (x.shape[-2], x.shape[-1])
    outs = []
    T = 1 if maps_only else mc_samples
    for i, m in enumerate(ensemble.members):
        member_seeds = None if seeds is None else [s * 31 + i for s in seeds]
        fine = get_spec(m.name).fine_layer if cfg.layer_fusion != "none" else None
        outs.append(run_member(m, x, T, member_seeds, fine_layer=fine))
    probs = torch.stack([o.mean_probs for o in outs])
    stats = [mc_statistics(o.probs) for o in outs]
    ens = probs.mean(0)
    bg = ensemble.background_index
    label = diagnose(ens, bg, ensemble.decision_threshold)
    if ensemble.decision_threshold is not None:  # each member decides by the same rule (which ones agree)
        for st in stats:
            st["label"] = diagnose(st["mean"], bg, ensemble.decision_threshold)
    if target is None:
        target = explained_class(ens, label, bg)
        if given is not None:
            # a finding the ensemble sees is explained as it sees it (a benign lesion called malignant is
            # still where the lesion is); a finding it misses, for its label
            given = given.to(label.device)
            target = torch.where((label == bg) & (given != bg), given, target)
    against = ensemble.background_index if cfg.contrast else None
    prior = ensemble.colour_prior
    rule = ensemble.evidence_rule if prior is not None and not maps_only else None
    maps, unc, raw_max, plain = [], [], [], []
    for m, o in zip(ensemble.members, outs, strict=True):
        if rule is not None and against is not None:
            # the rule weighs the plain map's evidence (what calibration fitted it on), whatever the recipe
            # explains: every recipe diagnoses an image alike
            with torch.enable_grad():
                pc = xgradcam(o.activation, _target_score(o.logits, target, None), retain_graph=True)
            pc = pc / pc.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
            plain.append(upsample(pc, size).clamp_(0.0, 1.0))
        cam, std = member_cams(m, o, target, against=against)
        mx = cam.amax(dim=(-2, -1))
        scale = mx.clamp_min(_EPS).view(-1, 1, 1)
        late = upsample(cam / scale, size).clamp_(0.0, 1.0)
        if against is None:
            plain.append(late)
        if o.fine is not None:
            fc = fine_cam(o, target, against)
            early = upsample(fc / fc.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS), size).clamp_(0.0, 1.0)
            late = _renormalise(0.5 * (late + early) if cfg.layer_fusion == "mean" else (late * early).sqrt())
        maps.append(late)
        unc.append(upsample(std / scale, size).clamp_min_(0.0))
        raw_max.append(mx)
    evidence = None
    if rule is not None and prior is not None:
        # the CAM target does not depend on this: a background diagnosis is explained for the most
        # probable finding, the very class a finding diagnosis would name
        label, evidence = _weigh_evidence(rule, prior, torch.stack(plain), x, ens, stats, bg)
    return Analysis([m.name for m in ensemble.members], probs, stats, ens, label, target,
                    torch.stack(maps), torch.stack(unc), torch.stack(raw_max), given=given, evidence=evidence)


def _weigh_evidence(rule: EvidenceRule, prior: ColourPrior, maps: torch.Tensor, x: torch.Tensor,
                    probs: torch.Tensor, stats: list[dict[str, torch.Tensor]], bg: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagnosis by ``rule`` from the plain last-layer maps ``(M, B, S, S)`` (the ensemble's evidence
    from their mean, each member's from its own, so that members agree by the same rule) -> (labels,
    the ensemble's evidence); the members' labels are set in ``stats``."""
    from pixelvote.explain.evidence import colour_evidence

    def decide(p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return finding_or_background(p, rule.finding(1.0 - p[:, bg], e), bg)

    *member_ev, evidence = colour_evidence(torch.cat([maps, maps.mean(0, keepdim=True)]), x, prior,
                                           rule.colour_weight)
    for st, e in zip(stats, member_ev, strict=True):
        st["label"] = decide(st["mean"], e)
    return decide(probs, evidence), evidence
