"""What to annotate: a folder (searched recursively) or a CSV manifest, with stable output keys."""

from __future__ import annotations

import csv
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pixelvote.data.dataset import _walk_images
from pixelvote.errors import DataError


@dataclass(frozen=True)
class Item:
    path: Path
    key: str  # output key: the stem, or the relative path without extension when stems collide

    @property
    def seed(self) -> int:
        return zlib.crc32(self.key.encode("utf-8"))


def list_inputs(images: str | Path) -> list[Item]:
    root = Path(images)
    if not root.exists():
        raise DataError("input not found", path=root, fix="pass a folder of images or a CSV manifest with a path column")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError("expected a folder or a .csv manifest", path=root,
                            fix="pass the folder that holds the images")
        with open(root, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in [f.strip().lower() for f in reader.fieldnames]:
                raise DataError("CSV manifest has no 'path' column", path=root, fix="add a header line with 'path'")
            paths = []
            for row in reader:
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                p = Path(row["path"])
                # normalised, so that '../x.png' cannot make a key (an output path) with '..' in it
                paths.append(Path(os.path.abspath(p if p.is_absolute() else root.parent / p)))
            paths = list(dict.fromkeys(paths))  # an image listed twice is annotated once
        base = Path(os.path.abspath(root.parent))
    else:
        paths = _walk_images(root)
        base = root
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
        items.append(Item(p, key))
    return _unique_keys(items)


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
                it = Item(it.path, f"{it.key}~{n_seen[it.key]}")
        out.append(it)
    return out
