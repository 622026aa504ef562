"""Class-index PNG masks: ``masks/<key>.png`` (8-bit) plus ``classes.json``.

Pixel values: 0 = background, ``i`` = 1 + the class's index among the non-background classes of
``annotate.json`` (``classes.json`` lists the mapping and, per image, its label and flags). Masks
keep the original image size; sub-folder keys keep their sub-folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pixelvote.export.outputs import OutputFolder, write_index_png, write_json

MAPPING_NOTE = (
    "0 = background; i = 1 + index of the class among the non-background classes (annotate.json order)"
)


def index_mask(folder: OutputFolder, rec: dict[str, Any]) -> np.ndarray:
    """The record's mask as uint8 class indices (height, width)."""
    value = folder.classes.value(folder.mask_class(rec))
    return np.where(folder.load_mask(rec), value, 0).astype(np.uint8)


def classes_document(folder: OutputFolder, files: dict[str, str], note: str) -> dict[str, Any]:
    classes = folder.classes
    return {
        "background": classes.background,
        "classes": classes.index_map(),
        "mapping": MAPPING_NOTE,
        "note": note,
        "images": {
            rec["key"]: {
                "file": files[rec["key"]],
                "label": rec["label"],
                "value": classes.value(folder.mask_class(rec)),
                "confidence": rec.get("probability"),
                "flagged": bool(rec.get("flagged", False)),
                "reasons": list(rec.get("reasons", [])),
            }
            for rec in folder.records
        },
    }


def export_png(folder: OutputFolder, to: Path) -> Path:
    """Write the masks under ``to/masks`` and ``to/classes.json``; returns ``to``."""
    files = {}
    for rec in folder.records:
        rel = f"masks/{rec['key']}.png"
        write_index_png(to / rel, index_mask(folder, rec))
        files[rec["key"]] = rel
    write_json(to / "classes.json", classes_document(folder, files, "8-bit PNG, original image size"))
    return to
