"""TBX11K reader: chest X-rays with image-level classes and TB boxes (Liu et al., CVPR 2020).

Layout (the official release; a TB-only subset keeps the same shape)::

    ROOT/imgs/<folder>/<name>.png         folders: health, sick (non-TB), tb, test (unlabelled), extra
    ROOT/annotations/xml/<name>.xml       Pascal-VOC boxes, one file per TB image
    ROOT/annotations/json/*.json          optional COCO-style boxes (TBX11K_train.json, ...)

The XML ``<size>`` is the ORIGINAL scan size (e.g. 2840x2827) and its boxes are in those pixels,
while the released PNGs are 512x512: boxes are rescaled to the size read from each image file's
header. VOC coordinates are 1-based and inclusive, so ``xmin..xmax`` becomes the pixel-edge box
``[xmin - 1, xmax)`` before scaling. COCO boxes ``[x, y, w, h]`` are already pixel-edge boxes in the
JSON image's ``width``/``height`` and are rescaled the same way when the file size differs.

Boxes everywhere are ``(x0, y0, x1, y1)`` floats in image pixels (see ``pixelvote.evaluate.metrics``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pixelvote.errors import ConfigError, DataError, did_you_mean
from pixelvote.evaluate.metrics import boxes_to_mask

__all__ = [
    "TB_BOX_CLASSES",
    "TBMapping",
    "TBX11KSample",
    "boxes_to_mask",
    "find_tbx11k_root",
    "is_tbx11k_root",
    "list_samples",
    "read_coco_boxes",
    "read_voc_xml",
    "sample_mask",
]

#: Box classes of TBX11K: active, latent ("obsolete") and uncertain-type TB.
TB_BOX_CLASSES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Folders under imgs/ that carry no usable class label (unlabelled test set, other datasets).
UNLABELLED_FOLDERS = ("test", "extra")

Box = tuple[float, float, float, float]


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_").replace("&", "_")


@dataclass(frozen=True)
class TBMapping:
    """Which image folders and box classes count as TB (foreground).

    Folder names are compared case-insensitively, with ``-`` and spaces read as ``_``.
    The defaults cover TBX11K's own folders (``tb`` → TB; ``health`` and ``sick`` — sick but not
    TB — → not TB) and common renamings (``healthy``, ``sick_but_non_tb``, ``active_tb``...).
    """

    tb_folders: frozenset[str] = frozenset(
        {
            "tb",
            "sick_tb",
            "active_tb",
            "latent_tb",
            "uncertain_tb",
            "active_latent_tb",
            "tuberculosis",
            "tb_positive",
        }
    )
    non_tb_folders: frozenset[str] = frozenset(
        {
            "health",
            "healthy",
            "sick",
            "sick_non_tb",
            "sick_but_non_tb",
            "non_tb",
            "normal",
            "no_tb",
            "tb_negative",
        }
    )
    tb_box_classes: frozenset[str] = frozenset(TB_BOX_CLASSES)

    def is_tb_folder(self, folder: str) -> bool:
        """True for a TB folder, False for a non-TB one; ConfigError for a folder in neither."""
        key = _norm(folder)
        if key in {_norm(f) for f in self.tb_folders}:
            return True
        if key in {_norm(f) for f in self.non_tb_folders}:
            return False
        known = sorted(self.tb_folders | self.non_tb_folders)
        raise ConfigError(
            f"image folder {folder!r} is neither a TB nor a non-TB class: {did_you_mean(folder, known)}",
            fix="name it in TBMapping(tb_folders=...) or TBMapping(non_tb_folders=...), or leave it out with "
            "list_samples(..., folders=[...])",
        )

    def foreground_boxes(self, sample: TBX11KSample) -> list[Box]:
        """The sample's boxes whose class counts as TB."""
        return [b for b, c in zip(sample.boxes, sample.box_classes, strict=True) if c in self.tb_box_classes]


@dataclass(frozen=True)
class TBX11KSample:
    """One image: its file, class folder, size and TB boxes in image pixels."""

    path: Path
    folder: str  # the class folder under imgs/, e.g. "tb", "health", "sick"
    tb: bool  # the folder's binary label under the mapping used to list it
    size: tuple[int, int]  # (height, width) of the image file
    boxes: tuple[Box, ...]  # (x0, y0, x1, y1) in image pixels
    box_classes: tuple[str, ...]
    annotation: Path | None  # the XML or JSON file the boxes came from

    @property
    def key(self) -> str:
        """``<folder>/<file name>``, the image's path relative to ``imgs/``."""
        return f"{self.folder}/{self.path.name}"


# --------------------------------------------------------------------------- layout


def is_tbx11k_root(path: str | Path) -> bool:
    """True when ``path`` has ``imgs/<folder>/`` and ``annotations/xml`` or ``annotations/json``."""
    root = Path(path)
    imgs, ann = root / "imgs", root / "annotations"
    return (
        imgs.is_dir()
        and any(p.is_dir() for p in imgs.iterdir())
        and ((ann / "xml").is_dir() or (ann / "json").is_dir())
    )


def find_tbx11k_root(path: str | Path) -> Path | None:
    """The TBX11K root at ``path``, above it (``path`` = ``imgs/`` or a class folder) or one level below."""
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        if is_tbx11k_root(candidate):
            return candidate
    if p.is_dir():
        for child in sorted(c for c in p.iterdir() if c.is_dir()):
            if is_tbx11k_root(child):
                return child
    return None


# --------------------------------------------------------------------------- annotation files


def _int_text(node: ET.Element, tag: str, path: Path) -> float:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"<{node.tag}> has no <{tag}>", path=path, fix="repair or remove the annotation file")
    try:
        return float(child.text)
    except ValueError:
        raise DataError(
            f"<{tag}> is {child.text.strip()!r}, not a number",
            path=path,
            fix="repair or remove the annotation file",
        ) from None


def read_voc_xml(
    path: str | Path, image_size: tuple[int, int] | None = None
) -> tuple[list[Box], list[str], tuple[int, int]]:
    """Boxes and class names of a Pascal-VOC XML, rescaled to ``image_size = (height, width)``.

    Returns ``(boxes, classes, original_size)`` with ``original_size`` the XML's ``<size>`` as
    ``(height, width)``; without ``image_size`` the boxes stay in the XML's pixels. Raises
    :class:`DataError` naming the file when it is not XML, or a size or coordinate is missing.
    """
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as err:
        raise DataError(
            f"is not valid XML ({err})", path=p, fix="repair or remove the annotation file"
        ) from None
    except OSError as err:
        raise DataError(f"cannot be read ({err.strerror})", path=p) from None
    size = root.find("size")
    if size is None:
        raise DataError(
            "has no <size> (the original scan's width and height, needed to place the boxes)",
            path=p,
            fix="add <size><width>W</width><height>H</height></size> with the scan's size",
        )
    width, height = _int_text(size, "width", p), _int_text(size, "height", p)
    if width <= 0 or height <= 0:
        raise DataError(f"<size> is {width:g}x{height:g}; expected positive numbers", path=p)
    sy, sx = (1.0, 1.0) if image_size is None else (image_size[0] / height, image_size[1] / width)
    boxes: list[Box] = []
    classes: list[str] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bnd = obj.find("bndbox")
        if not name or bnd is None:
            raise DataError(
                "has an <object> without <name> or <bndbox>",
                path=p,
                fix="repair or remove the annotation file",
            )
        xmin, ymin, xmax, ymax = (_int_text(bnd, t, p) for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise DataError(f"has a box with max < min: {(xmin, ymin, xmax, ymax)}", path=p)
        # VOC is 1-based inclusive: pixels xmin..xmax are the pixel-edge interval [xmin - 1, xmax).
        boxes.append(((xmin - 1) * sx, (ymin - 1) * sy, xmax * sx, ymax * sy))
        classes.append(name)
    return boxes, classes, (int(height), int(width))


def read_coco_boxes(path: str | Path) -> dict[str, tuple[list[Box], list[str], tuple[int, int]]]:
    """COCO-style JSON → ``{file_name: (boxes, classes, (height, width))}``, boxes in the JSON's pixels.

    ``file_name`` is as written in the JSON (TBX11K writes ``tb/tb0003.png``). Images without
    annotations are included with no boxes.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"is not valid JSON ({err})", path=p, fix="repair or remove the annotation file"
        ) from None
    except OSError as err:
        raise DataError(f"cannot be read ({err.strerror})", path=p) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError("is not a COCO annotation file (no 'images' list)", path=p)
    try:
        cats = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
        images: dict[Any, tuple[str, tuple[int, int]]] = {
            im["id"]: (str(im["file_name"]), (int(im["height"]), int(im["width"]))) for im in data["images"]
        }
        out: dict[str, tuple[list[Box], list[str], tuple[int, int]]] = {
            name: ([], [], size) for name, size in images.values()
        }
        for ann in data.get("annotations", []):
            name, _ = images[ann["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            out[name][0].append((x, y, x + w, y + h))
            out[name][1].append(cats.get(ann["category_id"], str(ann["category_id"])))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"has a malformed COCO entry ({type(err).__name__}: {err})", path=p) from None
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(
            f"is not a readable image ({err})", path=path, fix="remove or replace the file"
        ) from None
    return h, w


def _scale(boxes: list[Box], src: tuple[int, int], dst: tuple[int, int]) -> list[Box]:
    if src == dst:
        return list(boxes)
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]


def _coco_index(root: Path) -> dict[str, tuple[list[Box], list[str], tuple[int, int], Path]]:
    index: dict[str, tuple[list[Box], list[str], tuple[int, int], Path]] = {}
    json_dir = root / "annotations" / "json"
    if not json_dir.is_dir():
        return index
    for path in sorted(json_dir.glob("*.json")):
        for name, (boxes, classes, size) in read_coco_boxes(path).items():
            for key in (name.replace("\\", "/").removeprefix("./"), Path(name).name):
                if key not in index or (boxes and not index[key][0]):
                    index[key] = (boxes, classes, size, path)
    return index


# --------------------------------------------------------------------------- samples


def list_samples(
    root: str | Path,
    *,
    mapping: TBMapping | None = None,
    folders: Iterable[str] | None = None,
    source: Literal["auto", "xml", "json"] = "auto",
) -> list[TBX11KSample]:
    """Every labelled image under ``root/imgs/<folder>/``, sorted by folder then name.

    Args:
        root: the TBX11K root (see :func:`find_tbx11k_root`).
        mapping: which folders are TB; default :class:`TBMapping()`.
        folders: the class folders to read; default every folder except ``test`` and ``extra``.
        source: where boxes come from: ``"xml"``, ``"json"``, or ``"auto"`` (the image's XML when
            there is one, else a COCO JSON entry).

    Raises:
        DataError: not a TBX11K root, or a broken annotation or image file (named).
        ConfigError: a folder that the mapping does not place, or an unknown ``source``.
    """
    r = Path(root)
    if not is_tbx11k_root(r):
        raise DataError(
            "is not a TBX11K root (expected imgs/<class>/ and annotations/xml or annotations/json)",
            path=r,
            fix="point at the folder that holds imgs/ and annotations/",
        )
    if source not in ("auto", "xml", "json"):
        raise ConfigError(f"unknown box source: {did_you_mean(str(source), ['auto', 'xml', 'json'])}")
    mapping = mapping or TBMapping()
    present = sorted(p.name for p in (r / "imgs").iterdir() if p.is_dir())
    if folders is None:
        chosen = [f for f in present if _norm(f) not in UNLABELLED_FOLDERS]
    else:
        chosen = list(folders)
        for f in chosen:
            if f not in present:
                raise ConfigError(f"no image folder {f!r} under {r / 'imgs'}: {did_you_mean(f, present)}")
    xml_dir = r / "annotations" / "xml"
    coco = _coco_index(r) if source in ("auto", "json") else {}
    samples = []
    for folder in chosen:
        tb = mapping.is_tb_folder(folder)
        for path in sorted((r / "imgs" / folder).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            samples.append(_sample(path, folder, tb, xml_dir, coco, source))
    return samples


def _sample(
    path: Path,
    folder: str,
    tb: bool,
    xml_dir: Path,
    coco: dict[str, tuple[list[Box], list[str], tuple[int, int], Path]],
    source: str,
) -> TBX11KSample:
    size = _image_size(path)
    boxes: list[Box] = []
    classes: list[str] = []
    annotation: Path | None = None
    xml = xml_dir / f"{path.stem}.xml"
    entry = coco.get(f"{folder}/{path.name}") or coco.get(path.name)
    if source in ("auto", "xml") and xml.is_file():
        boxes, classes, _ = read_voc_xml(xml, size)
        annotation = xml
    elif source in ("auto", "json") and entry is not None:
        boxes, classes = _scale(entry[0], entry[2], size), list(entry[1])
        annotation = entry[3]
    return TBX11KSample(path, folder, tb, size, tuple(boxes), tuple(classes), annotation)


def sample_mask(sample: TBX11KSample, mapping: TBMapping | None = None) -> torch.Tensor:
    """The box-protocol truth: filled union of the sample's TB boxes, bool ``(H, W)`` at the image size."""
    return boxes_to_mask((mapping or TBMapping()).foreground_boxes(sample), sample.size)
