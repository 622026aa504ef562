"""Request and response bodies of the review API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pixelvote.review.settings import REVIEWER_PATTERN

Action = Literal["accept", "reject", "relabel", "edit"]


class DecisionIn(BaseModel):
    """One decision on one image.

    - ``accept``: keep the label and mask the reviewer saw (``based_on``); no ``label``, no ``mask_png``.
    - ``reject``: no finding: the background class and an empty mask; no ``mask_png``.
    - ``relabel``: ``label`` required; the mask the reviewer saw is kept (emptied for the background class).
    - ``edit``: ``mask_png`` required (base64 PNG of the image's size); ``label`` optional (default: the
      label the reviewer saw).

    ``based_on`` is the decision id the reviewer saw (0: the ensemble's prediction; omitted: whatever is
    current). ``request_id`` makes retries safe: a repeated one is stored once.
    """

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=1024)
    action: Action
    label: str | None = Field(None, min_length=1, max_length=200)
    mask_png: str | None = Field(None, min_length=1)
    reviewer: str | None = Field(None, pattern=REVIEWER_PATTERN)
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{8,100}$")
    based_on: int | None = Field(None, ge=0)
    note: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _fields_for_action(self) -> DecisionIn:
        if self.action != "edit" and self.mask_png is not None:
            raise ValueError(f"mask_png is only accepted with action 'edit', not {self.action!r}")
        if self.action == "edit" and self.mask_png is None:
            raise ValueError("action 'edit' needs mask_png (a base64 PNG of the image's size)")
        if self.action == "relabel" and self.label is None:
            raise ValueError("action 'relabel' needs label")
        if self.action == "accept" and self.label is not None:
            raise ValueError("action 'accept' takes no label (use 'relabel' to change it)")
        return self


class DecisionOut(BaseModel):
    id: int
    request_id: str | None
    key: str
    action: Action
    label: str
    predicted_label: str | None
    mask_area: int
    width: int
    height: int
    based_on: int | None
    reviewer: str
    created: str
    note: str | None
    mask_url: str


class DecisionResult(BaseModel):
    decision: DecisionOut
    duplicate: bool = Field(description="the request_id was stored before: nothing new was written")
    conflict: bool = Field(description="other decisions on this image came after the one the reviewer saw")
    intervening: list[DecisionOut] = []
    warning: str | None = None


class DecisionList(BaseModel):
    total: int
    items: list[DecisionOut]


class Current(BaseModel):
    reviewed: bool
    label: str
    mask_area: int
    decision_id: int = Field(description="0 when the image is not reviewed (the prediction is current)")
    action: Action | None = None
    reviewer: str | None = None
    created: str | None = None


class ImageSummary(BaseModel):
    key: str
    label: str
    probability: float | None
    flagged: bool
    reasons: list[str]
    uncertainty_mean: float | None
    agreement: float | None
    current: Current


class ImageList(BaseModel):
    total: int
    offset: int
    items: list[ImageSummary]


class ImageFiles(BaseModel):
    image: str
    overlay: str | None
    uncertainty: str | None
    mask: str
    predicted_mask: str


class ImageDetail(ImageSummary):
    width: int
    height: int
    probabilities: dict[str, float] = {}
    target_class: str | None = None
    members: dict[str, dict[str, Any]] = {}
    mask_area: int | None = None
    mask_fraction: float | None = None
    threshold: float | None = None
    image_name: str | None = None
    files: ImageFiles
    cams: dict[str, str] = {}
    cams_note: str
    history: list[DecisionOut]


class Meta(BaseModel):
    out: str
    name: str
    classes: list[str]
    background: str | None
    foreground: list[str]
    reasons: list[str]
    reviewer: str
    database: str


class Summary(BaseModel):
    images: int
    flagged: int
    reviewed: int
    reviewed_flagged: int
    decisions: int
    by_action: dict[str, int]
    by_label: dict[str, int]
    by_reason: dict[str, int]
    reviewers: dict[str, int]
