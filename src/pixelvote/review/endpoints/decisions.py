"""``/api/decisions``: record a decision (one SQLite transaction each), list them, fetch their masks."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Response

from pixelvote.export.outputs import read_mask
from pixelvote.review.endpoints import deps
from pixelvote.review.folder import ReviewIndex
from pixelvote.review.masks import b64decode, decode_mask, encode_mask
from pixelvote.review.schemas import DecisionIn, DecisionList, DecisionResult
from pixelvote.review.settings import ReviewSettings
from pixelvote.review.store import NewDecision, ReviewStore

router = APIRouter(tags=["decisions"])

Index = Annotated[ReviewIndex, Depends(deps.index)]
Store = Annotated[ReviewStore, Depends(deps.store)]
Settings = Annotated[ReviewSettings, Depends(deps.settings)]


def _base(idx: ReviewIndex, store: ReviewStore, rec: dict[str, Any], based_on: int | None,
          need_mask: bool) -> tuple[int, str, bytes, int]:
    """The state the reviewer saw: ``(decision id or 0, label, mask PNG, mask area)`` (the mask only
    when ``need_mask``: accept and relabel keep it)."""
    key = rec["key"]
    if based_on is None:
        latest = store.latest_for(key)
        based_on = latest.id if latest is not None else 0
    if based_on == 0:
        if not need_mask:
            return 0, str(rec["label"]), b"", 0
        mask = read_mask(idx.file_path(key, "mask"), int(rec["width"]), int(rec["height"]))
        return 0, str(rec["label"]), encode_mask(mask), int(mask.sum())
    d = store.get(based_on)
    if d is None or d.key != key:
        raise HTTPException(422, f"based_on: decision {based_on} is not a decision on image {key!r}")
    return d.id, d.label, store.mask_png(d.id) if need_mask else b"", d.mask_area


@router.post("/api/decisions", response_model=DecisionResult, status_code=201)
def add_decision(body: DecisionIn, idx: Index, store: Store, settings: Settings,
                 response: Response) -> dict[str, Any]:
    """Record one decision. 201: stored; 200: this ``request_id`` was stored before (nothing new)."""
    rec = deps.record_or_404(idx, body.key)
    w, h = int(rec["width"]), int(rec["height"])
    bg = idx.background
    base_id, label, mask_png, area = _base(idx, store, rec, body.based_on,
                                           need_mask=body.action in ("accept", "relabel"))
    warning = None
    if body.action == "reject":
        if bg is None:
            raise HTTPException(422, "this output folder has no background class, so 'no finding' cannot "
                                     "be recorded; use 'relabel' or 'edit'")
        if body.label is not None and body.label != bg:
            raise HTTPException(422, f"label: 'reject' records the background class {bg!r}, "
                                     f"not {body.label!r}; use 'relabel'")
        label, mask_png, area = bg, encode_mask(np.zeros((h, w), bool)), 0
    elif body.action == "relabel":
        label = deps.check_label(idx, str(body.label))
        if label == bg:
            mask_png, area = encode_mask(np.zeros((h, w), bool)), 0
        elif area == 0:
            warning = f"{label!r} with an empty mask: draw the finding with 'edit'"
    elif body.action == "edit":
        if body.label is not None:
            label = deps.check_label(idx, body.label)
        mask = decode_mask(b64decode(str(body.mask_png), max_bytes=settings.max_mask_bytes), w, h,
                           max_bytes=settings.max_mask_bytes)
        area = int(mask.sum())
        if area and label == bg:
            raise HTTPException(422, f"label: a drawn mask needs a finding class, not the background class "
                                     f"{bg!r}; pass one of {list(idx.foreground)}")
        mask_png = encode_mask(mask)
    reviewer = body.reviewer or settings.reviewer
    result = store.add(NewDecision(
        key=body.key, action=body.action, label=label, mask_png=mask_png, mask_area=area, width=w, height=h,
        reviewer=reviewer, predicted_label=str(rec["label"]), based_on=base_id, request_id=body.request_id,
        note=body.note,
    ))
    if result.duplicate:
        response.status_code = 200
    return {
        "decision": deps.decision_out(result.decision),
        "duplicate": result.duplicate,
        "conflict": bool(result.intervening),
        "intervening": [deps.decision_out(d) for d in result.intervening],
        "warning": warning,
    }


@router.get("/api/decisions", response_model=DecisionList)
def list_decisions(store: Store, key: str | None = Query(None, max_length=1024),
                   after: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=100_000)) -> dict[str, Any]:
    """Decisions in the order they were stored (ids after ``after``), optionally of one image."""
    rows = store.history(key) if key is not None else store.since(after, limit)
    rows = [d for d in rows if d.id > after][:limit]
    return {"total": store.count(), "items": [deps.decision_out(d) for d in rows]}


@router.get("/api/decisions/{decision_id}/mask")
def decision_mask(decision_id: int, store: Store) -> Response:
    """The mask a decision left its image with (0/255 greyscale PNG)."""
    try:
        data = store.mask_png(decision_id)
    except KeyError:
        raise HTTPException(404, f"no decision {decision_id}") from None
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
