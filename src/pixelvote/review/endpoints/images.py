"""``/api/images``: the queue, one image's details, and its pictures (``/api/files``)."""

from __future__ import annotations

import io
import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Response
from PIL import Image

from pixelvote.data.imageio import read_image
from pixelvote.errors import DataError, did_you_mean
from pixelvote.review.endpoints import deps
from pixelvote.review.folder import REASONS, QueueFilter, ReviewIndex, select
from pixelvote.review.schemas import ImageDetail, ImageList
from pixelvote.review.store import Decision, ReviewStore

logger = logging.getLogger(__name__)
router = APIRouter(tags=["images"])

CAMS_NOTE = ("Per-member CAMs are not stored in this output folder; shown instead: the ensemble's fused "
             "heat map (the overlay) and the per-pixel uncertainty map.")
_NO_STORE = {"Cache-Control": "no-store"}
_CACHE = {"Cache-Control": "private, max-age=300"}

Index = Annotated[ReviewIndex, Depends(deps.index)]
Store = Annotated[ReviewStore, Depends(deps.store)]


def _current(rec: dict[str, Any], d: Decision | None) -> dict[str, Any]:
    if d is None:
        area = rec.get("mask_area")
        return {"reviewed": False, "label": rec["label"], "mask_area": int(area) if area is not None else 0,
                "decision_id": 0}
    return {"reviewed": True, "label": d.label, "mask_area": d.mask_area, "decision_id": d.id,
            "action": d.action, "reviewer": d.reviewer, "created": d.created}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _summary(rec: dict[str, Any], d: Decision | None) -> dict[str, Any]:
    return {
        "key": rec["key"], "label": rec["label"], "probability": _num(rec.get("probability")),
        "flagged": bool(rec.get("flagged")), "reasons": list(rec.get("reasons") or []),
        "uncertainty_mean": _num(rec.get("uncertainty_mean")), "agreement": _num(rec.get("agreement")),
        "current": _current(rec, d),
    }


@router.get("/api/images", response_model=ImageList)
def list_images(
    idx: Index,
    store: Store,
    response: Response,
    flagged: bool | None = None,
    reviewed: bool | None = None,
    label: str | None = Query(None, max_length=200),
    reason: str | None = Query(None, max_length=100),
    offset: int = Query(0, ge=0),
    limit: int = Query(100_000, ge=1, le=100_000),
) -> dict[str, Any]:
    """The review queue: flagged first, then by uncertainty; filters combine with AND."""
    if label is not None:
        deps.check_label(idx, label)
    if reason is not None and reason not in REASONS:
        raise HTTPException(422, f"reason: unknown flag; {did_you_mean(reason, list(REASONS))}")
    latest = store.latest()
    rows = select(idx.records.values(), latest, QueueFilter(flagged, reviewed, label, reason))
    response.headers.update(_NO_STORE)
    items = [_summary(dict(r), latest.get(r["key"])) for r in rows[offset:offset + limit]]
    return {"total": len(rows), "offset": offset, "items": items}


def _file_url(idx: ReviewIndex, key: str, kind: str) -> str | None:
    try:
        return f"/api/files/{kind}/{deps.q(key)}" if idx.file_path(key, kind).is_file() else None
    except DataError:
        return None


@router.get("/api/images/{key:path}", response_model=ImageDetail)
def image_detail(key: str, idx: Index, store: Store, response: Response) -> dict[str, Any]:
    """Everything the page shows for one image, with its decision history (oldest first)."""
    rec = deps.record_or_404(idx, key)
    history = store.history(key)
    cur = history[-1] if history else None
    qk = deps.q(key)
    image = idx.image_path(key)
    out = _summary(rec, cur)
    out.update({
        "width": rec["width"], "height": rec["height"],
        "probabilities": {str(k): float(v) for k, v in (rec.get("probabilities") or {}).items()
                          if _num(v) is not None},
        "target_class": rec.get("target_class"),
        "members": rec.get("members") if isinstance(rec.get("members"), dict) else {},
        "mask_area": rec.get("mask_area"), "mask_fraction": _num(rec.get("mask_fraction")),
        "threshold": _num(rec.get("threshold")),
        "image_name": image.name if image is not None else None,
        "files": {
            "image": f"/api/files/image/{qk}",
            "overlay": _file_url(idx, key, "overlay"),
            "uncertainty": _file_url(idx, key, "uncertainty"),
            "mask": f"/api/files/mask/{qk}?v={cur.id if cur else 0}",
            "predicted_mask": f"/api/files/predicted-mask/{qk}",
        },
        "cams": {m: f"/api/files/cam/{qk}?member={deps.q(m)}" for m in idx.cam_paths(key)},
        "cams_note": "" if idx.cam_paths(key) else CAMS_NOTE,
        "history": [deps.decision_out(d) for d in history],
    })
    response.headers.update(_NO_STORE)
    return out


@lru_cache(maxsize=8)
def _encoded_image(path: str, mtime_ns: int, size: int) -> bytes:
    rgb = read_image(path)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _png(data: bytes, headers: dict[str, str]) -> Response:
    return Response(data, media_type="image/png", headers=headers)


def _serve_inside(path: Path, headers: dict[str, str] = _CACHE) -> Response:
    if not path.is_file():
        raise HTTPException(404, f"file not found: {path.name}")
    return Response(path.read_bytes(), media_type=_MEDIA.get(path.suffix.lower(), "image/png"),
                    headers=headers)


FileKind = Literal["image", "overlay", "uncertainty", "mask", "predicted-mask", "cam"]


@router.get("/api/files/{kind}/{key:path}")
def image_file(kind: FileKind, key: str, idx: Index, store: Store,
               member: str | None = Query(None, max_length=200)) -> Response:
    """One picture of an image, found by key. ``image`` is the original, re-encoded as PNG; ``mask`` the
    current mask (the latest decision's, else the prediction); ``cam`` needs ``member``."""
    deps.record_or_404(idx, key)
    if kind == "image":
        path = idx.image_path(key)
        if path is None or not path.is_file():
            raise HTTPException(404, f"the original image of {key!r} is not at {path}; the overlay shows it")
        st = path.stat()
        try:
            return _png(_encoded_image(str(path), st.st_mtime_ns, st.st_size), _CACHE)
        except DataError as exc:
            raise HTTPException(422, str(exc)) from exc
    if kind == "mask":
        d = store.latest_for(key)
        if d is not None:
            return _png(store.mask_png(d.id), _NO_STORE)
        return _serve_inside(idx.file_path(key, "mask"), _NO_STORE)
    if kind == "predicted-mask":
        return _serve_inside(idx.file_path(key, "mask"), _NO_STORE)
    if kind == "cam":
        cams = idx.cam_paths(key)
        if member is None or member not in cams:
            raise HTTPException(404, f"no CAM of member {member!r} for {key!r}; stored: {sorted(cams)}")
        return _serve_inside(idx.inside(cams[member]))
    return _serve_inside(idx.file_path(key, kind))
