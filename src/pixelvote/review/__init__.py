"""The review desk: a local web app where people check what the ensemble flagged.

``pixelvote review OUT`` runs :func:`run_review`; :func:`create_app` builds the FastAPI app from
:class:`ReviewSettings`; decisions live in ``OUT/review.sqlite`` (:class:`ReviewStore`) and reach the
exporters through :func:`reviewed_records` / :func:`apply_reviews`. See ``docs/review.md``.

Importing this package is cheap: FastAPI and uvicorn load only when the app is built.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_app": "pixelvote.review.app",
    "ReviewSettings": "pixelvote.review.settings",
    "run_review": "pixelvote.review.server",
    "serve": "pixelvote.review.server",
    "review_url": "pixelvote.review.server",
    "ReviewStore": "pixelvote.review.store",
    "apply_reviews": "pixelvote.review.apply",
    "reviewed_records": "pixelvote.review.apply",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pixelvote.review' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
