"""Colour evidence in the diagnosis: does the image hold a patch that both the models look at and that has
the finding's colour?

A classifier that has never seen a camera's images may give a finding there less probability than it
deserves (fire frames of an unseen video scored below fire-free photos). Where the finding has a colour of
its own, the run's colour prior (:mod:`pixelvote.refine.colour`) says which pixels could be it and the CAM
says where the models look; the strongest small patch of ``map^(1-w) * prior^w`` is evidence the
probability alone does not carry. :class:`EvidenceRule` is a logistic rule on the two, which ``train``
fits on the validation images and keeps only where it beats the probability threshold there (scored on
held-out halves, :func:`pixelvote.train.calibrate.choose_decision_rule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pixelvote.refine.colour import ColourPrior, colour_bins

# the patch is this fraction of the map's side (7 px at 224): one bright pixel of the right colour is not a
# finding
PATCH = 7 / 224


class EvidenceRule(BaseModel):
    """A finding where ``logit_coef * logit(P(finding)) + evidence_coef * evidence + intercept > 0``;
    ``evidence`` is :func:`colour_evidence` at ``colour_weight`` of the run's colour prior."""

    model_config = ConfigDict(extra="forbid")
    colour_weight: float = Field(gt=0.0, le=1.0)
    logit_coef: float
    evidence_coef: float
    intercept: float

    def score(self, p_finding: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        logit = torch.logit(p_finding.double().clamp(1e-6, 1 - 1e-6))
        return self.logit_coef * logit + self.evidence_coef * evidence.double() + self.intercept

    def finding(self, p_finding: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        return self.score(p_finding, evidence) > 0


def colour_evidence(maps: torch.Tensor, images: torch.Tensor, prior: ColourPrior, weight: float,
                    ) -> torch.Tensor:
    """The colour evidence of maps ``(..., B, S, S)`` in [0, 1] of images ``(B, 3, S, S)`` (uint8, or float
    in [0, 1]): the largest mean of ``map^(1-weight) * prior^weight`` over a patch of :data:`PATCH` of the
    side, ``(..., B)`` in [0, 1]."""
    S = maps.shape[-1]
    p = prior.table(maps.device)[colour_bins(images.to(maps.device), prior.bins)]
    s = maps.clamp(0.0, 1.0).pow(1.0 - weight) * p.pow(weight)
    k = max(1, round(S * PATCH)) | 1
    flat = s.reshape(-1, 1, *s.shape[-2:])
    pooled = F.avg_pool2d(flat, k, stride=1, padding=k // 2, count_include_pad=False)
    return pooled.flatten(1).amax(1).reshape(maps.shape[:-2])
