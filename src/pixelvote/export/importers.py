"""Read corrected annotations (COCO instances, Label Studio JSON export) into pixelvote's layout.

The result is an annotation output folder (``annotate.json``, ``annotations.jsonl``,
``masks/<key>.png``) whose records carry ``"reviewed": true`` and ``"source"``, so a corrected set
can be evaluated or used to retrain. Each image gets one mask (the union of its regions) and one
label: the reviewer's diagnosis choice when the tool has one (Label Studio), else the class covering
most pixels, else the background class (empty mask).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from pixelvote.errors import ConfigError, DataError
from pixelvote.export.lsbrush import rle2mask
from pixelvote.export.outputs import (
    META_FILE,
    RECORDS_FILE,
    check_key,
    keys_from_names,
    write_json,
    write_mask,
    write_text,
)

logger = logging.getLogger(__name__)
DEFAULT_BACKGROUND = "background"


def _load_json(path: Path, what: str, fix: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} file is missing", path=path, fix=fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot be read as JSON ({exc})", path=path, fix=fix) from exc


def _pick_label(choice: str | None, areas: dict[str, int], background: str) -> str:
    if choice is not None:
        return choice
    if areas and max(areas.values()) > 0:
        return max(sorted(areas), key=lambda n: areas[n])
    return background


def _write_output(
    to: Path,
    items: list[dict[str, Any]],
    classes: list[str],
    background: str,
    source: str,
    src: Path,
) -> Path:
    """Write masks, records and metadata of imported items into the new output folder ``to``."""
    records_file = to / RECORDS_FILE
    if records_file.is_file() and records_file.stat().st_size > 0:
        raise ConfigError(
            "already holds annotation records; importing would mix two sets",
            path=records_file,
            fix="import into a new, empty folder.",
        )
    if not items:
        raise DataError("holds no reviewed image to import", path=src)
    lines = []
    for it in items:
        label, mask = it["label"], it["mask"]
        if label == background and mask.any():
            logger.warning(
                "%s: %s: diagnosis is the background class; its regions are dropped", src, it["key"]
            )
            mask = np.zeros_like(mask)
        h, w = mask.shape
        area = int(mask.sum())
        rel = f"masks/{it['key']}.png"
        write_mask(to / rel, mask)
        rec = {
            "image": it.get("image"),
            "key": it["key"],
            "mask": rel,
            "width": w,
            "height": h,
            "label": label,
            "label_index": classes.index(label),
            "target_class": label,
            "mask_area": area,
            "mask_fraction": area / float(w * h),
            "flagged": False,
            "reasons": [],
            "reviewed": True,
            "source": source,
        }
        if it.get("reviewer"):
            rec["reviewer"] = it["reviewer"]
        if it.get("model"):
            rec["model"] = it["model"]
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_json(
        to / META_FILE,
        {
            "format_version": 1,
            "classes": classes,
            "background": background,
            "run": None,
            "consensus": None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "imported_from": {"format": source, "path": str(src)},
        },
    )
    write_text(records_file, "\n".join(lines) + "\n")
    return to


def _check_unique(keys: list[str], src: Path) -> None:
    seen = set()
    for k in keys:
        check_key(k, src)
        if k in seen:
            raise DataError(
                f"two images share the key {k!r}", path=src, fix="give the images distinct file names."
            )
        seen.add(k)


# --- COCO -----------------------------------------------------------------------------------------


def _coco_mask(seg: Any, h: int, w: int, where: str, src: Path) -> np.ndarray:
    from pycocotools import mask as mask_utils

    try:
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg, dict):
            counts = seg["counts"]
            rle = {
                "size": list(seg["size"]),
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
        else:
            raise TypeError(f"expected polygons or RLE but got {type(seg).__name__}")
        if rle is None:
            return np.zeros((h, w), bool)
        if list(rle["size"]) != [h, w]:
            raise ValueError(f"segmentation size {list(rle['size'])} is not the image's [{h}, {w}]")
        return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"{where}: bad segmentation ({exc})", path=src) from exc


def import_coco(src: str | Path, to: str | Path, *, background: str | None = None) -> Path:
    """Import a COCO instances file (polygons, RLE or compressed RLE) into the output folder ``to``."""
    src, to = Path(src), Path(to)
    fix = "pass a COCO instances JSON (images, categories, annotations)."
    coco = _load_json(src, "COCO", fix)
    try:
        images, categories = list(coco["images"]), list(coco["categories"])
        annotations = list(coco.get("annotations", []))
        cat_names = {c["id"]: str(c["name"]) for c in categories}
    except (KeyError, TypeError) as exc:
        raise DataError(f"not a COCO instances file (missing {exc})", path=src, fix=fix) from exc
    info = coco.get("info", {}).get("pixelvote", {}) if isinstance(coco.get("info"), dict) else {}
    background = background or info.get("background") or DEFAULT_BACKGROUND
    classes = [str(c) for c in info.get("classes", [])] or [cat_names[i] for i in sorted(cat_names)]
    if background not in classes:
        classes.append(background)
    unknown = sorted(set(cat_names.values()) - set(classes))
    if unknown:
        raise DataError(f"categories {unknown} are not among the classes {classes}", path=src, fix=fix)

    keys = [im.get("pixelvote_key") for im in images]
    if not all(keys):
        keys = keys_from_names([str(im["file_name"]) for im in images])
    _check_unique(keys, src)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)

    items = []
    for im, key in zip(images, keys, strict=True):
        h, w = int(im["height"]), int(im["width"])
        mask = np.zeros((h, w), bool)
        areas: dict[str, int] = {}
        for ann in by_image.get(im["id"], []):
            if ann["category_id"] not in cat_names:
                raise DataError(
                    f"annotation {ann.get('id')}: unknown category_id {ann['category_id']}", path=src
                )
            m = _coco_mask(ann["segmentation"], h, w, f"annotation {ann.get('id')}", src)
            name = cat_names[ann["category_id"]]
            areas[name] = areas.get(name, 0) + int(m.sum())
            mask |= m
        items.append(
            {
                "key": key,
                "image": im.get("pixelvote_image"),
                "label": _pick_label(None, areas, background),
                "mask": mask,
                "model": im.get("pixelvote"),
            }
        )
    return _write_output(to, items, classes, background, "coco", src)


# --- Label Studio ---------------------------------------------------------------------------------


def _ls_image_name(url: str) -> str:
    parsed = urlparse(url)
    d = parse_qs(parsed.query).get("d")
    return unquote(d[0]) if d else unquote(PurePosixPath(parsed.path).name)


def _ls_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's latest submitted (not cancelled) annotation, or None."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None
    return max(
        enumerate(anns), key=lambda ia: (str(ia[1].get("updated_at") or ia[1].get("created_at") or ""), ia[0])
    )[1]


def _reviewer(ann: dict[str, Any]) -> str | None:
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def import_labelstudio(src: str | Path, to: str | Path, *, background: str | None = None) -> Path:
    """Import a Label Studio JSON export (tasks with ``annotations``) into the output folder ``to``.

    Tasks without a submitted annotation are not reviewed and are skipped.
    """
    src, to = Path(src), Path(to)
    fix = "export the project from Label Studio as 'JSON' (a list of tasks with annotations)."
    tasks = _load_json(src, "Label Studio export", fix)
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise DataError("expected a list of tasks, each with 'data'", path=src, fix=fix)

    reviewed = [(t, a) for t in tasks if (a := _ls_annotation(t)) is not None]
    skipped = len(tasks) - len(reviewed)
    if skipped:
        logger.info(
            "%s: %d of %d tasks have no submitted annotation and are skipped", src, skipped, len(tasks)
        )
    data0: dict[str, Any] = next((t["data"] for t, _ in reviewed if "pixelvote_classes" in t["data"]), {})
    background = background or data0.get("pixelvote_background") or DEFAULT_BACKGROUND
    keys = [t["data"].get("pixelvote_key") for t, _ in reviewed]
    if not all(keys):
        keys = keys_from_names([_ls_image_name(str(t["data"].get("image", ""))) for t, _ in reviewed])
    _check_unique(keys, src)

    items, seen = [], set(data0.get("pixelvote_classes", []))
    for (task, ann), key in zip(reviewed, keys, strict=True):
        data = task["data"]
        w, h = data.get("pixelvote_width"), data.get("pixelvote_height")
        mask: np.ndarray | None = None
        areas: dict[str, int] = {}
        choice: str | None = None
        for res in ann.get("result") or []:
            kind = str(res.get("type", "")).lower()
            value = res.get("value") or {}
            if kind == "choices" and value.get("choices"):
                choice = str(value["choices"][0])
            elif kind == "brushlabels" and "rle" in value:
                rw, rh = res.get("original_width"), res.get("original_height")
                if w is not None and (rw, rh) != (w, h):
                    raise DataError(
                        f"task {key!r}: brush size {rw}x{rh} is not the image's {w}x{h}", path=src
                    )
                w, h = rw, rh
                try:
                    m = rle2mask(value["rle"], int(rw), int(rh))
                except (TypeError, ValueError) as exc:
                    raise DataError(f"task {key!r}: bad brush RLE ({exc})", path=src, fix=fix) from exc
                name = str((value.get("brushlabels") or [background])[0])
                areas[name] = areas.get(name, 0) + int(m.sum())
                mask = m if mask is None else mask | m
            elif kind not in ("choices", "brushlabels"):
                logger.warning("%s: task %r: ignoring a %r result", src, key, kind)
        if w is None or h is None:
            raise DataError(
                f"task {key!r}: image size unknown (no brush region and no pixelvote_width/height)",
                path=src,
                fix="export tasks made by `pixelvote export --format labelstudio`.",
            )
        label = _pick_label(choice, areas, background)
        seen.update([label, *areas])
        items.append(
            {
                "key": key,
                "image": data.get("pixelvote_image"),
                "label": label,
                "mask": mask if mask is not None else np.zeros((int(h), int(w)), bool),
                "reviewer": _reviewer(ann),
                "model": {
                    "label": data.get("label"),
                    "probability": data.get("confidence"),
                    "flagged": data.get("flagged"),
                }
                if "label" in data
                else None,
            }
        )
    classes = [str(c) for c in data0.get("pixelvote_classes", [])] or sorted(seen - {background})
    classes += sorted(seen - set(classes) - {background})
    if background not in classes:
        classes.append(background)
    return _write_output(to, items, classes, background, "labelstudio", src)


IMPORTERS = {"coco": import_coco, "labelstudio": import_labelstudio}
