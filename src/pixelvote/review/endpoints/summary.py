"""``/api/meta`` (what the page needs once) and ``/api/summary`` (counts and progress)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from pixelvote.review.endpoints import deps
from pixelvote.review.folder import REASONS, ReviewIndex, current_label
from pixelvote.review.schemas import Meta, Summary
from pixelvote.review.settings import ReviewSettings
from pixelvote.review.store import ReviewStore

router = APIRouter(tags=["summary"])

Index = Annotated[ReviewIndex, Depends(deps.index)]
Store = Annotated[ReviewStore, Depends(deps.store)]
Settings = Annotated[ReviewSettings, Depends(deps.settings)]


@router.get("/api/meta", response_model=Meta)
def meta(idx: Index, settings: Settings) -> dict[str, Any]:
    return {
        "out": str(idx.root), "name": idx.root.name, "classes": list(idx.classes),
        "background": idx.background, "foreground": list(idx.foreground), "reasons": list(REASONS),
        "reviewer": settings.reviewer, "database": str(settings.database),
    }


@router.get("/api/summary", response_model=Summary)
def summary(idx: Index, store: Store, response: Response) -> dict[str, Any]:
    latest = store.latest()
    records = list(idx.records.values())
    reviewed = [r for r in records if r["key"] in latest]
    by_reason: Counter[str] = Counter()
    for r in records:
        by_reason.update(r.get("reasons") or [])
    response.headers["Cache-Control"] = "no-store"
    return {
        "images": len(records),
        "flagged": sum(bool(r.get("flagged")) for r in records),
        "reviewed": len(reviewed),
        "reviewed_flagged": sum(bool(r.get("flagged")) for r in reviewed),
        "decisions": store.count(),
        "by_action": dict(Counter(latest[r["key"]].action for r in reviewed)),
        "by_label": dict(Counter(current_label(r, latest) for r in records)),
        "by_reason": dict(by_reason),
        "reviewers": dict(Counter(latest[r["key"]].reviewer for r in reviewed)),
    }
