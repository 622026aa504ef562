"""What to annotate: a folder (searched recursively) or a CSV manifest, with stable output keys."""

from __future__ import annotations

import csv
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pixelvote.data.dataset import _find_images_dir, _walk_images
from pixelvote.errors import DataError


@dataclass(frozen=True)
class Item:
    path: Path
    key: str  # output key: the stem, or the relative path without extension when stems collide
    label: str | None = None  # the image-level label, when the inputs are labelled (list_inputs(labels=True))

    @property
    def seed(self) -> int:
        return zlib.crc32(self.key.encode("utf-8"))



def _csv_labels(root: Path, labels: bool) -> dict[Path, str]:
    """The images a CSV manifest lists (absolute paths), each with its ``label`` column ("" without)."""
    try:
        with open(root, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "path" not in fields:
                raise DataError("CSV manifest has no 'path' column", path=root,
                                fix="add a header line with 'path'")
            if labels and "label" not in fields:
                raise DataError("CSV manifest has no 'label' column, so its images have no labels", path=root,
                                fix="add a 'label' column with each image's class, or drop --labels")
            given: dict[Path, str] = {}
            for i, row in enumerate(reader, start=2):
                # a line with more fields than the header gives them under the key None
                row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                if not row.get("path"):
                    raise DataError(f"line {i} has an empty path", path=root,
                                    fix="fill in the image's path or delete the line")
                p = Path(row["path"])
                # normalised, so that '../x.png' cannot make a key (an output path) with '..' in it
                p = Path(os.path.abspath(p if p.is_absolute() else root.parent / p))
                if labels and not row.get("label"):
                    raise DataError(f"line {i} ({row['path']}) has no label", path=root,
                                    fix="fill in its label, or annotate without --labels")
                given.setdefault(p, row.get("label", ""))  # an image listed twice is annotated once
    except UnicodeDecodeError:
        raise DataError("CSV manifest is not UTF-8 text", path=root, fix="save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"CSV manifest cannot be read ({exc})", path=root,
                        fix="check its quoting: a field with a comma or a quote must be in double quotes"
                        ) from None
    if not given:
        raise DataError("CSV manifest lists no images", path=root,
                        fix="add one line per image under its header ('path' column)")
    return given


def list_inputs(images: str | Path, *, labels: bool = False) -> list[Item]:
    """The images under a folder (searched recursively) or in a CSV manifest's ``path`` column. With
    ``labels`` each item also gets its image-level label: the class folder it sits in (``DIR/<class>/...``
    or ``DIR/images/<class>/...``) or the manifest's ``label`` column."""
    root = Path(images)
    if not root.exists():
        raise DataError("input not found", path=root,
                        fix="pass a folder of images or a CSV manifest with a path column")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError("expected a folder or a .csv manifest", path=root,
                            fix="pass the folder that holds the images")
        given = _csv_labels(root, labels)
        paths = list(given)
        base = Path(os.path.abspath(root.parent))
    else:
        paths = _walk_images(root)
        base = root
        if labels:
            given = _folder_labels(root, paths)
            paths = [p for p in paths if p in given]
    if not paths:
        raise DataError("no images found (PNG, JPEG, BMP or TIFF, searched recursively)", path=root,
                        fix="check the folder")
    def rel(p: Path) -> Path:
        try:
            return p.relative_to(base)
        except ValueError:
            return Path(*p.parts[-3:])

    stems = Counter(p.stem for p in paths)
    no_ext = Counter(rel(p).with_suffix("").as_posix() for p in paths)
    items = []
    for p in paths:
        key = p.stem
        if stems[p.stem] > 1:
            key = rel(p).with_suffix("").as_posix()
            if no_ext[key] > 1:  # same stem in the same folder with another extension
                key = rel(p).as_posix()
        items.append(Item(p, key, given[p] if labels else None))
    return _unique_keys(items)


def _folder_labels(root: Path, paths: list[Path]) -> dict[Path, str]:
    """Each image's class folder: the first folder under ``root``, or under ``root/images`` (then images
    elsewhere, such as ``root/masks/...``, are not inputs)."""
    top, _ = _find_images_dir(root)
    out = {}
    for p in paths:
        parts = p.relative_to(root).parts
        if top != root:
            if parts[0] != "images":
                continue  # e.g. DIR/masks/...: not an input of a labelled images/<class>/ tree
            parts = parts[1:]
        if len(parts) < 2:
            raise DataError("this image is not inside a class folder, so it has no label", path=p,
                            fix=f"put each image in {top}/<class>/ (the run's class names), or annotate "
                                "without --labels")
        out[p] = parts[0]
    return out


def _unique_keys(items: list[Item]) -> list[Item]:
    """Two inputs never share a key (their outputs would overwrite each other): in the rare cases the rules
    above leave a clash (``a/x.png`` beside ``a/x.jpg`` and ``a/x.png.png``), later ones get ``~2``,
    ``~3``."""
    counts = Counter(it.key for it in items)
    if all(n == 1 for n in counts.values()):
        return items
    n_seen: Counter[str] = Counter()
    out = []
    for it in items:
        if counts[it.key] > 1:
            n_seen[it.key] += 1
            if n_seen[it.key] > 1:
                it = Item(it.path, f"{it.key}~{n_seen[it.key]}", it.label)
        out.append(it)
    return out
