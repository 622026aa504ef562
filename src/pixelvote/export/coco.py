"""COCO instances files and COCO results lists, masks as compressed RLE (pycocotools).

``coco``: ``{"info", "images", "categories", "annotations"}``; one annotation per image whose mask
is not empty, with ``segmentation`` (RLE, ``counts`` as ASCII), ``area``, ``bbox``, ``iscrowd`` 0,
``score`` (the ensemble's probability of its label) and ``attributes`` holding pixelvote's
uncertainty, agreement and flag. Images are numbered 1..N in key order; category ids are the
foreground classes numbered from 1 in ``annotate.json`` order (the background class is no category:
a background image simply has no annotation).

``coco-results``: the list form ``COCO.loadRes`` and ``COCOeval`` take (``image_id``,
``category_id``, ``segmentation``, ``score``). Give ``coco_gt=`` a ground-truth instances file to
number images as it does (matched by ``pixelvote_key``, then ``file_name``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pixelvote.errors import DataError
from pixelvote.export.outputs import OutputFolder, image_names, keys_from_names, write_json


def encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool mask, ``counts`` decoded to ASCII so it serialises to JSON."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Bool mask (height, width) of a compressed RLE as written by :func:`encode`."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    obj = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(obj).astype(bool)


def _area_bbox(rle: dict[str, Any]) -> tuple[int, list[float]]:
    from pycocotools import mask as mask_utils

    obj = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(obj)), [float(v) for v in mask_utils.toBbox(obj).tolist()]


def _attributes(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "uncertainty": rec.get("uncertainty_mean"),
        "agreement": rec.get("agreement"),
        "flagged": bool(rec.get("flagged", False)),
        "reasons": list(rec.get("reasons", [])),
    }


def build_coco(folder: OutputFolder) -> dict[str, Any]:
    """The COCO instances dict for an output folder."""
    classes = folder.classes
    names = image_names(folder)
    records = sorted(folder.records, key=lambda r: r["key"])
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, rec in enumerate(records, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": names[rec["key"]],
                "width": rec["width"],
                "height": rec["height"],
                "pixelvote_key": rec["key"],
                "pixelvote_image": rec.get("image"),
                "pixelvote": {
                    "label": rec["label"],
                    "probability": rec.get("probability"),
                    **_attributes(rec),
                },
            }
        )
        mask = folder.load_mask(rec)
        if not mask.any():
            continue
        cls = folder.mask_class(rec)
        if cls == classes.background:
            raise DataError(
                f"record {rec['key']!r} has a non-empty mask but the background label {cls!r}",
                path=folder.mask_path(rec),
                fix="background images must have an all-zero mask; re-run `pixelvote annotate`.",
            )
        rle = encode(mask)
        area, bbox = _area_bbox(rle)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": classes.category_id(cls),
                "segmentation": rle,
                "area": area,
                "bbox": bbox,
                "iscrowd": 0,
                "score": rec.get("probability"),
                "attributes": _attributes(rec),
            }
        )
    return {
        "info": {
            "description": "pixelvote annotations",
            "version": "1",
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pixelvote": {"classes": list(classes.names), "background": classes.background},
        },
        "licenses": [],
        "images": images,
        "categories": [
            {"id": classes.category_id(n), "name": n, "supercategory": "pixelvote"}
            for n in classes.foreground
        ],
        "annotations": annotations,
    }


def export_coco(folder: OutputFolder, to: Path) -> Path:
    write_json(to, build_coco(folder), indent=None)
    return to


def _gt_maps(gt_path: Path, folder: OutputFolder) -> tuple[dict[str, int], dict[str, int]]:
    """Image ids by pixelvote key and category ids by name, as a ground-truth file numbers them."""
    try:
        gt = json.loads(Path(gt_path).read_text(encoding="utf-8"))
        images, categories = gt["images"], gt["categories"]
        by_name = {im["file_name"]: im["id"] for im in images}
        cat_ids = {c["name"]: c["id"] for c in categories}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"cannot be read as a COCO instances file ({exc})",
            path=gt_path,
            fix="pass the COCO instances JSON the results will be evaluated against.",
        ) from exc
    by_key = dict(zip(keys_from_names(list(by_name)), by_name.values(), strict=True))
    by_key.update({key: by_name[name] for key, name in image_names(folder).items() if name in by_name})
    by_key.update({im["pixelvote_key"]: im["id"] for im in images if "pixelvote_key" in im})
    return by_key, cat_ids


def export_coco_results(folder: OutputFolder, to: Path, *, coco_gt: str | Path | None = None) -> Path:
    """Write the COCO results list.

    With ``coco_gt`` (a COCO instances file) image and category ids follow that file and images or
    classes it does not have are left out.
    """
    coco = build_coco(folder)
    keys = {im["id"]: im["pixelvote_key"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    image_ids, cat_ids = _gt_maps(Path(coco_gt), folder) if coco_gt is not None else ({}, {})
    results = []
    for ann in coco["annotations"]:
        image_id, cat_id = ann["image_id"], ann["category_id"]
        if coco_gt is not None:
            image_id, cat_id = image_ids.get(keys[image_id]), cat_ids.get(names[cat_id])
            if image_id is None or cat_id is None:
                continue
        results.append(
            {
                "image_id": image_id,
                "category_id": cat_id,
                "segmentation": ann["segmentation"],
                "score": ann["score"] if ann["score"] is not None else 1.0,
            }
        )
    write_json(to, results, indent=None)
    return to
