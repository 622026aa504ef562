"""A MONAI Label local datastore: images, ``labels/original/`` predictions and ``datastore_v2.json``.

MONAI Label's ``LocalDatastore`` keeps images flat in the datastore root (``images_dir`` ".") and a
label per tag under ``labels/<tag>/`` with the image's id as file stem; ``original`` is the tag for
model predictions and ``final`` for labels a reviewer saved. The id is the key with '/' replaced by
``__`` (the datastore is flat). Labels are class-index PNGs (0 = background, i = 1 + index among
the non-background classes, as ``classes.json`` lists); pixelvote's confidence and flags go in the
label's ``info``. An existing ``datastore_v2.json`` keeps its other objects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pixelvote.errors import DataError
from pixelvote.export.outputs import OutputFolder, atomic_path, write_index_png, write_json

DATASTORE_FILE = "datastore_v2.json"
ORIGINAL, FINAL = "original", "final"


def datastore_id(key: str) -> str:
    return key.replace("/", "__")


def _checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return f"SHA256:{h.hexdigest()}"


def _load_existing(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"existing datastore file cannot be read ({exc})",
            path=path,
            fix="export to a new folder, or delete the broken datastore_v2.json.",
        ) from exc
    return data if isinstance(data, dict) else {}


def export_monailabel(folder: OutputFolder, to: Path) -> Path:
    """Fill the datastore folder ``to`` (images are copied); returns its ``datastore_v2.json``."""
    classes = folder.classes
    to.mkdir(parents=True, exist_ok=True)
    (to / "labels" / FINAL).mkdir(parents=True, exist_ok=True)
    store_file = to / DATASTORE_FILE
    store = _load_existing(store_file)
    if (store.get("images_dir", "."), store.get("labels_dir", "labels")) != (".", "labels"):
        raise DataError(
            "existing datastore keeps images or labels elsewhere than '.' and 'labels'",
            path=store_file,
            fix="export to a new, empty folder.",
        )
    objects: dict[str, Any] = dict(store.get("objects", {}))
    now = int(time.time())
    for rec in folder.records:
        image_id = datastore_id(rec["key"])
        src = folder.image_path(rec)
        if src is None or not src.is_file():
            raise DataError(
                f"image of record {rec['key']!r} is missing",
                path=src or folder.records_path,
                fix="MONAI Label needs the images; run the export where the annotated images are.",
            )
        ext = "".join(src.suffixes[-2:]) if src.name.lower().endswith(".nii.gz") else src.suffix
        dest = to / f"{image_id}{ext}"
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        mask = folder.load_mask(rec)
        values = np.where(mask, classes.value(folder.mask_class(rec)), 0).astype(np.uint8)
        label_file = to / "labels" / ORIGINAL / f"{image_id}.png"
        write_index_png(label_file, values)
        objects[image_id] = {
            "image": {"ext": ext, "info": {"ts": now, "name": dest.name, "pixelvote_key": rec["key"]}},
            "labels": {
                **objects.get(image_id, {}).get("labels", {}),
                ORIGINAL: {
                    "ext": ".png",
                    "info": {
                        "ts": now,
                        "checksum": _checksum(label_file),
                        "name": label_file.name,
                        "label_names": classes.index_map(),
                        "pixelvote": {
                            "label": rec["label"],
                            "confidence": rec.get("probability"),
                            "flagged": bool(rec.get("flagged", False)),
                            "reasons": list(rec.get("reasons", [])),
                            "agreement": rec.get("agreement"),
                            "uncertainty": rec.get("uncertainty_mean"),
                        },
                    },
                },
            },
        }
    store = {
        "name": store.get("name", "pixelvote"),
        "description": store.get("description", "pixelvote predictions for review"),
        "images_dir": ".",
        "labels_dir": "labels",
        "objects": objects,
    }
    write_json(store_file, store)
    write_json(to / "classes.json", {"background": classes.background, "classes": classes.index_map()})
    return store_file
