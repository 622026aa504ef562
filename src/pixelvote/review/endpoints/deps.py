"""Shared pieces of the routers: the app's state, URLs, and decision rows as API objects."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Request

from pixelvote.errors import did_you_mean
from pixelvote.review.folder import ReviewIndex
from pixelvote.review.settings import ReviewSettings
from pixelvote.review.store import Decision, ReviewStore


def settings(request: Request) -> ReviewSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def index(request: Request) -> ReviewIndex:
    idx: ReviewIndex = request.app.state.index
    idx.refresh()
    return idx


def store(request: Request) -> ReviewStore:
    return request.app.state.store  # type: ignore[no-any-return]


def q(key: str) -> str:
    """An image key as a URL path segment ('/' kept: keys may hold sub-folders)."""
    return quote(key, safe="/")


def record_or_404(idx: ReviewIndex, key: str) -> dict[str, Any]:
    try:
        return idx.record(key)
    except KeyError:
        raise HTTPException(404, f"no image with key {key!r} in this output folder") from None


def check_label(idx: ReviewIndex, label: str, field: str = "label") -> str:
    if label not in idx.classes:
        raise HTTPException(422, f"{field}: unknown class; {did_you_mean(label, list(idx.classes))}")
    return label


def decision_out(d: Decision) -> dict[str, Any]:
    return {**d.to_dict(), "mask_url": f"/api/decisions/{d.id}/mask"}
