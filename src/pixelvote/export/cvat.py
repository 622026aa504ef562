"""CVAT for images 1.1 XML with ``<mask>`` shapes and one ``<tag>`` per image.

A CVAT mask stores run lengths over its bounding box only: row-major inside the box crop, starting
with a (possibly empty) background run, then alternating foreground/background; ``left``/``top``
give the box corner and ``width``/``height`` its size (the same encoding as ``cvat_sdk.masks``
``encode_mask``, unlike COCO's column-major whole-image RLE). An image whose mask is empty gets no
``<mask>``. Every image gets a ``<tag>`` with the ensemble's diagnosis, whose ``flagged``,
``confidence`` and ``reasons`` attributes are declared in the label list (CVAT keeps attributes
only when the task's labels declare them; ``<to stem>_labels.json`` is that list in the form of
CVAT's label constructor "Raw" tab).

``to`` ending in ``.zip`` gives a zip holding ``annotations.xml`` (CVAT accepts both).
"""

from __future__ import annotations

import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np

from pixelvote.errors import DataError
from pixelvote.export.outputs import OutputFolder, atomic_path, image_names, write_json

_ATTRIBUTES = (
    {
        "name": "flagged",
        "mutable": False,
        "input_type": "checkbox",
        "default_value": "false",
        "values": ["false"],
    },
    {"name": "confidence", "mutable": False, "input_type": "text", "default_value": "", "values": [""]},
    {"name": "reasons", "mutable": False, "input_type": "text", "default_value": "", "values": [""]},
)


def encode_mask(mask: np.ndarray) -> tuple[list[int], int, int, int, int] | None:
    """CVAT run lengths and box (left, top, width, height) of a bool mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    left, top = int(xs.min()), int(ys.min())
    width, height = int(xs.max()) + 1 - left, int(ys.max()) + 1 - top
    flat = np.asarray(mask[top : top + height, left : left + width], dtype=bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        runs = [0, *runs]
    return runs, left, top, width, height


def decode_mask(
    runs: list[int], left: int, top: int, width: int, height: int, image_w: int, image_h: int
) -> np.ndarray:
    """Bool (image_h, image_w) mask of a CVAT mask's run lengths and box."""
    if not (
        0 <= left
        and 0 <= top
        and width > 0
        and height > 0
        and left + width <= image_w
        and top + height <= image_h
    ):
        raise ValueError(f"mask box {left},{top} {width}x{height} does not fit a {image_w}x{image_h} image")
    values = (np.arange(len(runs)) % 2).astype(bool)
    crop = np.repeat(values, runs)
    if crop.size != width * height:
        raise ValueError(f"mask runs cover {crop.size} pixels, expected {width}x{height}")
    full = np.zeros((image_h, image_w), dtype=bool)
    full[top : top + height, left : left + width] = crop.reshape(height, width)
    return full


def labels_path(to: Path) -> Path:
    return to.with_name(to.stem + "_labels.json")


def _label_spec(names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"name": n, "type": "any", "attributes": [dict(a) for a in _ATTRIBUTES]} for n in names]


def build_xml(folder: OutputFolder) -> ET.Element:
    """The CVAT for images 1.1 document, images in lexical name order (CVAT's default frame order)."""
    now = datetime.now(timezone.utc).isoformat(sep=" ", timespec="seconds")
    names = image_names(folder)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    for tag, text in (
        ("id", "0"),
        ("name", "pixelvote"),
        ("size", str(len(folder.records))),
        ("mode", "annotation"),
        ("overlap", "0"),
        ("bugtracker", ""),
        ("flipped", "False"),
        ("created", now),
        ("updated", now),
    ):
        ET.SubElement(task, tag).text = text
    labels = ET.SubElement(task, "labels")
    for spec in _label_spec(folder.classes.names):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = spec["name"]
        ET.SubElement(label, "type").text = spec["type"]
        attrs = ET.SubElement(label, "attributes")
        for a in spec["attributes"]:
            attr = ET.SubElement(attrs, "attribute")
            for k in ("name", "mutable", "input_type", "default_value"):
                ET.SubElement(attr, k).text = str(a[k]) if k != "mutable" else str(a[k]).capitalize()
            ET.SubElement(attr, "values").text = "\n".join(a["values"])
    ET.SubElement(meta, "dumped").text = now

    for frame, rec in enumerate(sorted(folder.records, key=lambda r: names[r["key"]])):
        image = ET.SubElement(
            root,
            "image",
            {
                "id": str(frame),
                "name": names[rec["key"]],
                "width": str(rec["width"]),
                "height": str(rec["height"]),
            },
        )
        enc = encode_mask(folder.load_mask(rec))
        if enc is not None:
            runs, left, top, width, height = enc
            ET.SubElement(
                image,
                "mask",
                {
                    "label": folder.mask_class(rec),
                    "source": "auto",
                    "occluded": "0",
                    "rle": ", ".join(str(r) for r in runs),
                    "left": str(left),
                    "top": str(top),
                    "width": str(width),
                    "height": str(height),
                    "z_order": "0",
                },
            )
        tag_el = ET.SubElement(image, "tag", {"label": rec["label"], "source": "auto"})
        p = rec.get("probability")
        for name, value in (
            ("flagged", "true" if rec.get("flagged") else "false"),
            ("confidence", "" if p is None else f"{float(p):.4f}"),
            ("reasons", ",".join(rec.get("reasons", []))),
        ):
            ET.SubElement(tag_el, "attribute", {"name": name}).text = value
    ET.indent(root)
    return root


def export_cvat(folder: OutputFolder, to: Path) -> Path:
    """Write ``to`` (``.xml``, or ``.zip`` holding ``annotations.xml``) and the label list beside it."""
    root = build_xml(folder)
    with atomic_path(to) as tmp:
        if to.suffix.lower() == ".zip":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("annotations.xml", ET.tostring(root, encoding="utf-8", xml_declaration=True))
        else:
            ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    write_json(labels_path(to), _label_spec(folder.classes.names))
    return to


def read_cvat(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a CVAT for images 1.1 file (XML or zip) into ``{image name: item}``.

    Each item has ``width``, ``height``, ``mask``, ``labels`` and ``tags``.

    ``mask`` is the union of the image's ``<mask>`` shapes, ``labels`` their labels, ``tags`` the
    labels of its ``<tag>`` elements.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as zf:
                root = ET.fromstring(zf.read("annotations.xml"))
        else:
            root = ET.parse(path).getroot()
    except (OSError, KeyError, zipfile.BadZipFile, ET.ParseError) as exc:
        raise DataError(f"cannot be read as CVAT for images 1.1 ({exc})", path=path) from exc
    out: dict[str, dict[str, Any]] = {}
    for image in root.iter("image"):
        w, h = int(image.get("width", 0)), int(image.get("height", 0))
        item: dict[str, Any] = {
            "width": w,
            "height": h,
            "mask": np.zeros((h, w), bool),
            "labels": [],
            "tags": [],
        }
        for m in image.iter("mask"):
            runs = [int(v) for v in m.get("rle", "").split(",") if v.strip()]
            left, top, width, height = (int(m.get(k, 0)) for k in ("left", "top", "width", "height"))
            try:
                item["mask"] |= decode_mask(runs, left, top, width, height, w, h)
            except ValueError as exc:
                raise DataError(f"image {image.get('name')!r}: {exc}", path=path) from exc
            item["labels"].append(m.get("label"))
        item["tags"] = [t.get("label") for t in image.iter("tag")]
        out[str(image.get("name"))] = item
    return out
