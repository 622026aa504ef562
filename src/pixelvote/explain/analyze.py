"""Run every member once per image: MC-Dropout statistics from T head samples and XGrad-CAM maps.

The backbone runs once; only the head (dropout + linear) is sampled T times on the pooled features.
Each MC sample's CAM is the XGrad-CAM of that sample's target logit; its gradient at the CAM layer is
``J^T v_t`` with ``J = d pooled / d A`` and ``v_t = w_target * mask_t`` (the dropout mask, scaled), so
all T maps come from one batched vector-Jacobian product - or in closed form when the CAM layer is
the map that is pooled (then ``dy/dA = v_t / (h w)`` everywhere and XGrad-CAM = Grad-CAM = CAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pixelvote.explain.hooks import ActivationCapture
from pixelvote.explain.xgradcam import weighted_map, xgradcam, xgradcam_weights
from pixelvote.models.ensemble import Ensemble
from pixelvote.models.member import Member, mc_dropout

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
        out[:, b] = torch.bernoulli(torch.full((T, shape[1]), keep), generator=g) / keep
    return out.to(device)


def run_member(member: Member, x: torch.Tensor, T: int, seeds: list[int] | None = None) -> MemberOutput:
    """Forward ``x`` (normalised, (B,3,H,W)) once; sample the head T times."""
    with torch.no_grad(), ActivationCapture(member.backbone, member.cam_layer) as cap:
        feats = member.features(x)
        pooled = member.pool(feats)
        logits = member.fc(pooled)
    assert cap.activation is not None
    pooled_d = pooled.detach()
    masks = sample_dropout_masks(member, tuple(pooled_d.shape), T, x.device, seeds)
    with torch.no_grad():
        sample_logits = torch.einsum("tbc,kc->tbk", pooled_d.unsqueeze(0) * masks, member.fc.weight)
        probs = torch.softmax(sample_logits + member.fc.bias, dim=-1)
    return MemberOutput(probs, pooled_d, cap.activation, logits, masks, pooled)


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


def member_cams(member: Member, out: MemberOutput, target: torch.Tensor, *,
                chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """XGrad-CAM of ``target`` (B,) without dropout, ``(B, h, w)``, and the std over the T MC samples' CAMs,
    ``(B, h, w)``; both raw (not normalised)."""
    A = out.activation
    with torch.enable_grad():  # callers may run under no_grad; the graph from A to the logits exists
        score = out.logits.gather(1, target.view(-1, 1)).squeeze(1)
        cam = xgradcam(A, score, retain_graph=not member.final_cam_layer)
    Ad = A.detach()
    w_target = member.fc.weight.detach()[target]  # (B, C)
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


def analyze(ensemble: Ensemble, images: torch.Tensor, *, mc_samples: int = 30,
            target: torch.Tensor | None = None, seeds: list[int] | None = None) -> Analysis:
    """Analyse a batch of images ``(B, 3, S, S)`` (uint8 or [0,1] float) with every member.

    The CAM target is ``target`` when given, else the ensemble's diagnosis, or - for a background diagnosis -
    the most probable non-background class (so a reviewer still sees where the models looked)."""
    x = ensemble.normalize(images)
    size = (x.shape[-2], x.shape[-1])
    outs = []
    for i, m in enumerate(ensemble.members):
        member_seeds = None if seeds is None else [s * 31 + i for s in seeds]
        outs.append(run_member(m, x, mc_samples, member_seeds))
    probs = torch.stack([o.mean_probs for o in outs])
    stats = [mc_statistics(o.probs) for o in outs]
    ens = probs.mean(0)
    label = ens.argmax(-1)
    if target is None:
        bg = ensemble.background_index
        fg = ens.clone()
        fg[:, bg] = -1.0
        target = torch.where(label == bg, fg.argmax(-1), label)
    maps, unc, raw_max = [], [], []
    for m, o in zip(ensemble.members, outs):
        cam, std = member_cams(m, o, target)
        mx = cam.amax(dim=(-2, -1))
        scale = mx.clamp_min(_EPS).view(-1, 1, 1)
        maps.append(upsample(cam / scale, size).clamp_(0.0, 1.0))
        unc.append(upsample(std / scale, size).clamp_min_(0.0))
        raw_max.append(mx)
    return Analysis([m.name for m in ensemble.members], probs, stats, ens, label, target,
                    torch.stack(maps), torch.stack(unc), torch.stack(raw_max))
