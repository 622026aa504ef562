"""The page and its three static files, served from the package (no CDN, no other path)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(tags=["page"], include_in_schema=False)

_FILES = {
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
}


def _read(name: str) -> bytes:
    return resources.files("pixelvote.review").joinpath("static").joinpath(name).read_bytes()


@router.get("/")
def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in _FILES:
        raise HTTPException(404, "no such file")
    return Response(_read(name), media_type=_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
