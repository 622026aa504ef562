"""Materialise review decisions: reviewed masks and labels replace the ensemble's predictions.

Two ways, both reading ``OUT/review.sqlite`` without FastAPI:

- :func:`reviewed_records` rewrites records in memory (for :func:`pixelvote.export.outputs.open_output`,
  so ``pixelvote export --from OUT`` exports the reviewed set). Reviewed masks are written once, to
  ``OUT/review/masks/<key>.d<decision id>.png``, and the record's ``mask`` points there.
- :func:`apply_reviews` writes a new, self-contained output folder that every exporter reads unchanged.

A reviewed record gets the decision's ``label`` (and ``label_index``, ``target_class``), its mask,
``mask_area`` and ``mask_fraction``, and ``"reviewed": true``, ``"reviewer"``, ``"source": "review"``
and ``"review": {action, decision_id, time, predicted_label, predicted_mask, note}``. The ensemble's
``probability``, ``flagged`` and ``reasons`` stay as they were: they describe the prediction.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pixelvote.data.imageio import check_out_dir, write_bytes_atomic
from pixelvote.errors import ConfigError, DataError
from pixelvote.export.outputs import META_FILE, RECORDS_FILE, open_output, write_json, write_text
from pixelvote.review.store import DB_FILE, Decision, ReviewStore

logger = logging.getLogger(__name__)

REVIEW_MASKS = "review/masks"


def reviewed_record(rec: dict[str, Any], d: Decision, classes: Sequence[str], mask: str) -> dict[str, Any]:
    """``rec`` with decision ``d`` applied; ``mask`` is the reviewed mask's path (relative to OUT).

    Idempotent: a record that already carries ``d`` only gets the new mask path.
    """
    if isinstance(rec.get("review"), dict) and rec["review"].get("decision_id") == d.id:
        return dict(rec, mask=mask)
    w, h = int(rec["width"]), int(rec["height"])
    out = dict(rec)
    out.update(
        label=d.label,
        label_index=list(classes).index(d.label),
        target_class=d.label,
        mask=mask,
        mask_area=d.mask_area,
        mask_fraction=round(d.mask_area / float(w * h), 6),
        reviewed=True,
        reviewer=d.reviewer,
        source="review",
        review={"action": d.action, "decision_id": d.id, "time": d.created,
                "predicted_label": rec["label"], "predicted_mask": rec.get("mask"), "note": d.note},
    )
    return out


def _usable(rec: dict[str, Any], d: Decision, classes: Sequence[str]) -> bool:
    if (d.width, d.height) != (rec["width"], rec["height"]):
        logger.warning("%r: ignoring review decision %d: it was made on a %dx%d image, the record is %dx%d",
                       rec["key"], d.id, d.width, d.height, rec["width"], rec["height"])
        return False
    if d.label not in classes:
        logger.warning("%r: ignoring review decision %d: unknown class %r", rec["key"], d.id, d.label)
        return False
    return True


def reviewed_records(out_dir: str | Path, records: Iterable[dict[str, Any]],
                     classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``records`` with the latest decision of ``OUT/review.sqlite`` applied to each reviewed image.

    Without a review database the records come back unchanged (and no database is created). Each
    reviewed mask is written once to ``OUT/review/masks/<key>.d<id>.png`` (to a temporary folder when
    OUT is read-only). ``classes`` defaults to those of ``OUT/annotate.json``.
    """
    root = Path(out_dir)
    records = list(records)
    if not (root / DB_FILE).is_file():
        return records
    if classes is None:
        classes = open_output(root).classes.names
    with ReviewStore(root / DB_FILE, create=False) as store:
        latest = store.latest()
        out = []
        fallback: Path | None = None
        for rec in records:
            d = latest.get(rec["key"])
            if d is None or not _usable(rec, d, classes):
                out.append(rec)
                continue
            rel = f"{REVIEW_MASKS}/{rec['key']}.d{d.id}.png"
            target = root / rel
            if not target.is_file():
                try:
                    write_bytes_atomic(target, store.mask_png(d.id))
                except OSError as exc:
                    if fallback is None:
                        fallback = Path(tempfile.mkdtemp(prefix="pixelvote-review-"))
                        logger.warning("%s is not writable (%s); reviewed masks go to %s",
                                       root, exc, fallback)
                    target = fallback / rel
                    write_bytes_atomic(target, store.mask_png(d.id))
                    rel = str(target)  # absolute: OutputFolder.mask_path joins it as is
            out.append(reviewed_record(rec, d, classes, rel))
    return out


def _copy(src: Path, dst: Path) -> bool:
    if not src.is_file():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return True


def apply_reviews(out_dir: str | Path, to: str | Path, *, only_reviewed: bool = False) -> Path:
    """Write the output folder ``out_dir`` with its review decisions applied to the new folder ``to``.

    ``to`` gets ``annotate.json`` (with a ``"review"`` summary), ``annotations.jsonl``, ``masks/``
    (reviewed masks replace predicted ones), ``overlays/`` and ``uncertainty/``; every exporter reads
    it unchanged (``pixelvote export --from TO``). ``only_reviewed`` keeps only reviewed images.
    Returns ``to``. Raises :class:`ConfigError` when ``to`` is ``out_dir`` or already holds records.
    """
    src, dst = Path(out_dir), check_out_dir(to, "--apply-to")
    if dst.resolve() == src.resolve():
        raise ConfigError("the reviewed folder must differ from the output folder", path=dst,
                          fix="pass a new folder.")
    if (dst / RECORDS_FILE).exists():
        raise ConfigError("already holds annotation records", path=dst / RECORDS_FILE,
                          fix="pass a new, empty folder.")
    folder = open_output(src)
    classes = folder.classes.names
    store = ReviewStore(src / DB_FILE, create=False) if (src / DB_FILE).is_file() else None
    latest = store.latest() if store is not None else {}
    lines, reviewed = [], 0
    try:
        for rec in folder.records:
            key = rec["key"]
            d = latest.get(key)
            d = d if d is not None and _usable(rec, d, classes) else None
            if d is None and only_reviewed:
                continue
            mask_rel = f"masks/{key}.png"
            if d is not None and store is not None:
                write_bytes_atomic(dst / mask_rel, store.mask_png(d.id))
                new = reviewed_record(rec, d, classes, mask_rel)
                reviewed += 1
            else:
                if not _copy(folder.mask_path(rec), dst / mask_rel):
                    raise DataError("mask file is missing", path=folder.mask_path(rec),
                                    fix="re-run `pixelvote annotate` for this image.")
                new = dict(rec, mask=mask_rel)
            for kind in ("overlay", "uncertainty"):
                rel = rec.get(kind)
                if isinstance(rel, str) and (src / rel).resolve().is_relative_to(src.resolve()):
                    if not _copy(src / rel, dst / rel):
                        new.pop(kind, None)
            lines.append(new)
    finally:
        if store is not None:
            store.close()
    meta = dict(folder.meta)
    meta["review"] = {"from": str(src.resolve()), "reviewed": reviewed, "images": len(lines),
                      "only_reviewed": only_reviewed,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(dst / META_FILE, meta)
    write_text(dst / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    logger.info("wrote %d images (%d reviewed) to %s", len(lines), reviewed, dst)
    return dst
