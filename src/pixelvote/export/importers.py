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

from pixelvote.data.imageio import file_above
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
    if path.is_dir():
        raise DataError(
            f"is a folder, but --from expects a {what} file",
            path=path,
            fix=f"pass the {what} JSON file itself with --from, not the folder holding it.",
        )
    if not path.exists():
        raise DataError(f"{what} file is missing (no such file)", path=path, fix=fix)
    if not path.is_file():
        raise DataError(f"is not a regular file, but --from expects a {what} file", path=path, fix=fix)
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
    blocker = to if to.exists() and not to.is_dir() else file_above(to)
    if blocker is not None:
        raise ConfigError(
            "is a file, but --to must be the new annotation output folder"
            if blocker == to
            else f"cannot create the --to folder: {blocker} is a file",
            path=to,
            fix="pass a new, empty folder with --to.",
        )
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


def _json_kind(value: Any) -> str:
    """How JSON names the type of ``value`` (for messages)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    """COCO ids are integers; some tools write strings, which work as well."""
    return _is_int(value) or (isinstance(value, str) and bool(value))


def _coco_lists(coco: Any, src: Path, fix: str) -> tuple[list[Any], list[Any], list[Any]]:
    """The ``images``, ``categories`` and ``annotations`` lists of a COCO instances file."""
    expected = "expected a JSON object with 'images', 'annotations' and 'categories' lists"
    if not isinstance(coco, dict):
        raise DataError(
            f"not a COCO instances file: {expected} but got {_json_kind(coco)}", path=src, fix=fix
        )
    lists = []
    for name in ("images", "categories", "annotations"):
        if name not in coco and name != "annotations":  # no annotations: every image is background
            raise DataError(f"not a COCO instances file (missing {name!r}): {expected}", path=src, fix=fix)
        value = coco.get(name, [])
        if not isinstance(value, list):
            raise DataError(
                f"not a COCO instances file: {name!r} is {_json_kind(value)}; {expected}", path=src, fix=fix
            )
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                raise DataError(
                    f"{name}[{i}] is {_json_kind(entry)}, expected an object", path=src, fix=fix
                )
        lists.append(value)
    return lists[0], lists[1], lists[2]


def _coco_categories(categories: list[dict[str, Any]], src: Path, fix: str) -> dict[Any, str]:
    names = {}
    for i, c in enumerate(categories):
        if not _is_id(c.get("id")) or not isinstance(c.get("name"), str) or not c["name"]:
            raise DataError(
                f"categories[{i}] needs an integer 'id' and a 'name' but is {json.dumps(c)[:200]}",
                path=src,
                fix=fix,
            )
        names[c["id"]] = c["name"]
    return names


def _coco_image_size(im: dict[str, Any], where: str, src: Path) -> tuple[int, int]:
    """An image entry's (height, width): positive integers within pixelvote's pixel limit."""
    from pixelvote.data import imageio

    fix = "give every image entry its size in pixels as positive integers 'width' and 'height'."
    size = []
    for name in ("height", "width"):
        value = im.get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not _is_int(value) or value <= 0:
            got = "no " + repr(name) if name not in im else f"{name!r} {json.dumps(im[name])}"
            raise DataError(f"{where}: expected a positive integer {name!r} but got {got}", path=src, fix=fix)
        size.append(value)
    h, w = size
    if w * h > imageio.MAX_PIXELS:
        raise DataError(
            f"{where}: {w}x{h} pixels is over pixelvote's limit of {imageio.MAX_PIXELS} pixels",
            path=src,
            fix="check the image's width and height, or raise pixelvote.data.imageio.MAX_PIXELS "
            "if it is genuine.",
        )
    return h, w


def import_coco(src: str | Path, to: str | Path, *, background: str | None = None) -> Path:
    """Import a COCO instances file (polygons, RLE or compressed RLE) into the output folder ``to``.

    Raises :class:`DataError` naming the entry for a malformed file: an image without a usable id,
    size or file name, an annotation whose ``image_id`` or ``category_id`` names no image or
    category, or a segmentation that cannot be decoded at its image's size.
    """
    src, to = Path(src), Path(to)
    fix = "pass a COCO instances JSON (images, categories, annotations) with --from."
    coco = _load_json(src, "COCO", fix)
    images, categories, annotations = _coco_lists(coco, src, fix)
    cat_names = _coco_categories(categories, src, fix)
    info = coco.get("info", {}).get("pixelvote", {}) if isinstance(coco.get("info"), dict) else {}
    info = info if isinstance(info, dict) else {}
    background = background or str(info.get("background") or "") or DEFAULT_BACKGROUND
    info_classes = info.get("classes") if isinstance(info.get("classes"), list) else []
    by_id = sorted(cat_names, key=lambda i: (isinstance(i, str), i))
    classes = [str(c) for c in info_classes] or [cat_names[i] for i in by_id]
    if background not in classes:
        classes.append(background)
    unknown = sorted(set(cat_names.values()) - set(classes))
    if unknown:
        raise DataError(f"categories {unknown} are not among the classes {classes}", path=src, fix=fix)

    sizes, ids = [], set()
    for i, im in enumerate(images):
        where = f"image {json.dumps(im.get('id'))} (images[{i}])"
        if not _is_id(im.get("id")):
            raise DataError(f"{where}: expected an integer 'id'", path=src, fix=fix)
        if im["id"] in ids:
            raise DataError(f"{where}: two images share the id {im['id']}", path=src, fix=fix)
        ids.add(im["id"])
        sizes.append(_coco_image_size(im, where, src))
    keys = [im.get("pixelvote_key") for im in images]
    if not all(keys):
        for i, im in enumerate(images):
            if not isinstance(im.get("file_name"), str) or not im["file_name"]:
                raise DataError(
                    f"image {json.dumps(im['id'])} (images[{i}]): expected a 'file_name'", path=src, fix=fix
                )
        keys = keys_from_names([im["file_name"] for im in images])
    _check_unique(keys, src)
    by_image: dict[Any, list[tuple[str, dict[str, Any]]]] = {}
    for j, ann in enumerate(annotations):
        where = f"annotation {json.dumps(ann['id'])}" if "id" in ann else f"annotations[{j}]"
        for name in ("image_id", "category_id", "segmentation"):
            if name not in ann:
                raise DataError(f"{where}: no {name!r}", path=src, fix=fix)
        if not _is_id(ann["image_id"]) or ann["image_id"] not in ids:
            raise DataError(
                f"{where}: image_id {json.dumps(ann['image_id'])} is not the id of any image in 'images'",
                path=src,
                fix="give each annotation the id of an image listed in 'images', or remove the annotation.",
            )
        if not _is_id(ann["category_id"]) or ann["category_id"] not in cat_names:
            raise DataError(
                f"{where}: unknown category_id {json.dumps(ann['category_id'])}",
                path=src,
                fix="give each annotation the id of a category listed in 'categories'.",
            )
        by_image.setdefault(ann["image_id"], []).append((where, ann))

    items = []
    for im, key, (h, w) in zip(images, keys, sizes, strict=True):
        mask = np.zeros((h, w), bool)
        areas: dict[str, int] = {}
        for where, ann in by_image.get(im["id"], []):
            m = _coco_mask(ann["segmentation"], h, w, where, src)
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
