"""The output folder as the review desk sees it: records by key, the queue, and safe file paths.

Files are found by image key, never by a path from a request, and every path a record names is
resolved (symbolic links included) and refused unless it lies inside the output folder. The one
exception is the original image, which ``pixelvote annotate`` leaves where it was: it is served only as
the record names it, and only decoded and re-encoded as PNG (so a crafted record cannot make the server
hand out a file that is not an image).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelvote.engine.render import output_paths
from pixelvote.errors import DataError
from pixelvote.export.outputs import RECORDS_FILE, OutputFolder, open_output
from pixelvote.review.store import Decision

logger = logging.getLogger(__name__)

FILE_KINDS = ("mask", "overlay", "uncertainty")
REASONS = ("disagreement", "high_mutual_information", "high_variance", "low_confidence", "empty_mask",
           "no_agreeing_member", "segmenter_disagrees", "label_disagrees")


class OutsideFolderError(DataError):
    """A record names a file outside the output folder (refused with 403)."""


@dataclass(frozen=True)
class QueueFilter:
    """Queue filters; ``None`` means 'any'. ``label`` matches the current label (the reviewed one
    when an image is reviewed, else the ensemble's)."""

    flagged: bool | None = None
    reviewed: bool | None = None
    label: str | None = None
    reason: str | None = None


class ReviewIndex:
    """The records of one output folder, reloaded when ``annotations.jsonl`` changes (an annotation run
    still in progress keeps adding images)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir).resolve()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self.folder: OutputFolder = open_output(self.root)
        self._index(self.folder)

    def _index(self, folder: OutputFolder) -> None:
        self.folder = folder
        self.records: dict[str, dict[str, Any]] = {r["key"]: r for r in folder.records}
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = (self.root / RECORDS_FILE).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def refresh(self) -> None:
        """Reload the records if ``annotations.jsonl`` changed; a broken reload keeps the old ones."""
        if self._stat() == self._stamp:
            return
        with self._lock:
            if self._stat() == self._stamp:
                return
            try:
                self._index(open_output(self.root))
                logger.info("reloaded %d records from %s", len(self.records), self.root / RECORDS_FILE)
            except DataError as exc:
                logger.warning("keeping the records read before: %s", exc)
                self._stamp = self._stat()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.folder.classes.names

    @property
    def background(self) -> str | None:
        return self.folder.classes.background

    @property
    def foreground(self) -> tuple[str, ...]:
        return self.folder.classes.foreground

    def record(self, key: str) -> dict[str, Any]:
        """The record of ``key``; ``KeyError`` when no image has that key."""
        return self.records[key]

    def inside(self, rel: str | Path) -> Path:
        """``rel`` resolved against the folder; :class:`OutsideFolderError` unless it stays inside."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise OutsideFolderError("refused: the record names a file outside the output folder",
                                     path=str(rel), fix="repair annotations.jsonl.")
        return path

    def file_path(self, key: str, kind: str) -> Path:
        """Path of the record's ``mask``, ``overlay`` or ``uncertainty`` file (checked to be inside)."""
        rec = self.record(key)
        default = output_paths(key)[kind]
        rel = rec.get(kind)
        return self.inside(rel if isinstance(rel, str) and rel else default)

    def cam_paths(self, key: str) -> dict[str, str]:
        """Per-member CAM images, when a record lists them (optional ``"cams": {member: path}``)."""
        cams = self.record(key).get("cams")
        if not isinstance(cams, dict):
            return {}
        return {str(k): str(v) for k, v in cams.items() if isinstance(v, str)}

    def image_path(self, key: str) -> Path | None:
        image = self.record(key).get("image")
        return Path(image) if isinstance(image, str) and image else None


def current_label(rec: Mapping[str, Any], latest: Mapping[str, Decision]) -> str:
    d = latest.get(rec["key"])
    return d.label if d is not None else str(rec["label"])


def _uncertainty(rec: Mapping[str, Any]) -> float:
    u = rec.get("uncertainty_mean")
    return float(u) if isinstance(u, (int, float)) else 0.0


def queue_order(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Flagged images first, then the most uncertain (mean per-pixel uncertainty, then the lowest
    probability), then by key."""

    def sort_key(r: Mapping[str, Any]) -> tuple[int, float, float, str]:
        p = r.get("probability")
        return (0 if r.get("flagged") else 1, -_uncertainty(r),
                float(p) if isinstance(p, (int, float)) else 0.0, str(r["key"]))

    return sorted(records, key=sort_key)


def select(records: Iterable[Mapping[str, Any]], latest: Mapping[str, Decision],
           f: QueueFilter) -> list[Mapping[str, Any]]:
    """The queue: ``records`` that pass the filter ``f``, in :func:`queue_order`."""
    out = []
    for r in records:
        if f.flagged is not None and bool(r.get("flagged")) != f.flagged:
            continue
        if f.reviewed is not None and (r["key"] in latest) != f.reviewed:
            continue
        if f.label is not None and current_label(r, latest) != f.label:
            continue
        if f.reason is not None and f.reason not in (r.get("reasons") or []):
            continue
        out.append(r)
    return queue_order(out)
