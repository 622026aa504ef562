"""Read an annotation output folder (``pixelvote annotate --out OUT``) and write files atomically.

The layout is described in ``docs/formats.md``. Every exporter goes through this module, so the
checks (missing or corrupt files, masks of the wrong size, a torn last line) live in one place and
all report a :class:`~pixelvote.errors.DataError` that names the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pixelvote.errors import DataError

logger = logging.getLogger(__name__)

META_FILE = "annotate.json"
RECORDS_FILE = "annotations.jsonl"
_REQUIRED = ("key", "mask", "width", "height", "label")


@dataclass(frozen=True)
class Classes:
    """The class list of an output folder and the index mapping every exporter shares.

    ``foreground`` is ``names`` without the background class; class-index masks use
    0 = background and ``foreground.index(name) + 1`` for the others.
    """

    names: tuple[str, ...]
    background: str | None

    @property
    def foreground(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n != self.background)

    def value(self, name: str) -> int:
        """Pixel value of ``name`` in a class-index mask (0 for the background class)."""
        if name == self.background:
            return 0
        return self.foreground.index(name) + 1

    def category_id(self, name: str) -> int:
        """COCO category id of a foreground class (1-based, same as :meth:`value`)."""
        return self.foreground.index(name) + 1

    def index_map(self) -> dict[str, str]:
        """``{"0": background, "1": first foreground class, ...}`` for ``classes.json``."""
        out = {"0": self.background if self.background is not None else "background"}
        out.update({str(i + 1): n for i, n in enumerate(self.foreground)})
        return out


@dataclass
class OutputFolder:
    """An annotation output folder: its metadata, classes and records (masks load lazily)."""

    root: Path
    meta: dict[str, Any]
    classes: Classes
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def records_path(self) -> Path:
        return self.root / RECORDS_FILE

    def mask_path(self, record: dict[str, Any]) -> Path:
        return self.root / record["mask"]

    def load_mask(self, record: dict[str, Any]) -> np.ndarray:
        """The record's mask as a bool array of shape (height, width)."""
        return read_mask(self.mask_path(record), int(record["width"]), int(record["height"]))

    def mask_class(self, record: dict[str, Any]) -> str:
        """The class a record's mask shows: its ``target_class`` if foreground, else its ``label``."""
        target = record.get("target_class")
        if target in self.classes.foreground:
            return str(target)
        return str(record["label"])

    def image_path(self, record: dict[str, Any]) -> Path | None:
        image = record.get("image")
        return Path(image) if image else None


def open_output(out_dir: str | Path) -> OutputFolder:
    """Read ``annotate.json`` and every complete record of ``annotations.jsonl``.

    Raises :class:`DataError` (naming the file) when the folder, the metadata or the records file is
    missing or corrupt, when a record lacks a required field or names an unknown class, or when no
    complete record exists.
    """
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        inside = root.name in (META_FILE, RECORDS_FILE, "skipped.jsonl")
        raise DataError(
            "is a file, not an annotation output folder",
            path=root,
            fix="pass the folder given to `pixelvote annotate --out`"
            + (f" (the folder holding this file: {root.parent})." if inside else "."),
        )
    if not root.is_dir():
        raise DataError(
            "not an annotation output folder (it does not exist)",
            path=root,
            fix="pass the folder given to `pixelvote annotate --out`.",
        )
    meta = _read_meta(root / META_FILE)
    classes = Classes(tuple(str(c) for c in meta["classes"]), meta.get("background"))
    if classes.background is not None and classes.background not in classes.names:
        raise DataError(
            f"background class {classes.background!r} is not one of the classes {list(classes.names)}",
            path=root / META_FILE,
            fix="repair annotate.json or re-run `pixelvote annotate`.",
        )
    records = list(iter_records(root / RECORDS_FILE))
    if not records:
        raise DataError(
            "holds no complete annotation record",
            path=root / RECORDS_FILE,
            fix="run `pixelvote annotate` until at least one image is done.",
        )
    for rec in records:
        for name in (rec["label"], rec.get("target_class")):
            if name is not None and name not in classes.names:
                raise DataError(
                    f"record {rec['key']!r} names class {name!r}, expected one of {list(classes.names)}",
                    path=root / RECORDS_FILE,
                    fix="use the output folder and annotate.json written by the same run.",
                )
    return OutputFolder(root=root, meta=meta, classes=classes, records=records)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(
            "missing: an annotation output folder starts with annotate.json",
            path=path,
            fix="pass the folder given to `pixelvote annotate --out` (annotate writes this file first).",
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"cannot be read as JSON ({exc})", path=path, fix="re-run `pixelvote annotate`."
        ) from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list) or not meta["classes"]:
        raise DataError(
            "expected a JSON object with a non-empty 'classes' list",
            path=path,
            fix="re-run `pixelvote annotate`.",
        )
    return meta


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of an ``annotations.jsonl``, ignoring a torn last line.

    A record whose key appears again later is replaced by the later one (a resumed run re-did it);
    the order is that of first appearance.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "missing: no annotation records",
            path=path,
            fix="run `pixelvote annotate --out` on this folder first.",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot be read ({exc})", path=path, fix="re-run `pixelvote annotate`.") from exc
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    by_key: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                logger.warning("%s: ignoring the torn last line %d (an image cut off mid-write)", path, i + 1)
                continue
            raise DataError(
                f"line {i + 1} is not valid JSON ({exc.msg})",
                path=path,
                fix="delete that line (the image will be annotated again) or re-run `pixelvote annotate`.",
            ) from exc
        _check_record(rec, path, i + 1)
        by_key[rec["key"]] = rec
    yield from by_key.values()


def _check_record(rec: Any, path: Path, line: int) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"line {line}: expected a JSON object", path=path, fix="re-run `pixelvote annotate`.")
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise DataError(
            f"line {line}: record lacks {', '.join(missing)}",
            path=path,
            fix="re-run `pixelvote annotate`; records need key, mask, width, height and label.",
        )
    check_key(rec["key"], path)
    w, h = rec["width"], rec["height"]
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        raise DataError(
            f"line {line}: expected positive integer width and height but got {w!r} x {h!r}",
            path=path,
            fix="re-run `pixelvote annotate`.",
        )


def check_key(key: Any, path: str | Path | None = None) -> str:
    """Check that an image key is a safe relative '/'-separated path (no '..', no absolute path)."""
    parts = key.split("/") if isinstance(key, str) else []
    if not isinstance(key, str) or not key or "\\" in key or any(p in ("..", ".", "") for p in parts):
        raise DataError(
            f"expected an image key that is a relative path without '..' but got {key!r}",
            path=path,
            fix="keys are image file stems, optionally with their sub-folder (e.g. 'a/scan 01').",
        )
    return key


def read_mask(path: str | Path, width: int, height: int) -> np.ndarray:
    """Read a 0/255 mask PNG as a bool array, checking it has the record's size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError("mask file is missing", path=path, fix="re-run `pixelvote annotate` for this image.")
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
            arr = np.asarray(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(
            f"mask cannot be read ({exc})", path=path, fix="re-run `pixelvote annotate`."
        ) from exc
    if size != (width, height):
        raise DataError(
            f"expected a mask of {width}x{height} (the original image size) but got {size[0]}x{size[1]}",
            path=path,
            fix="masks must be written at the original image size; re-run `pixelvote annotate`.",
        )
    return arr > 0  # any non-zero value is foreground, as pixelvote's own reader treats masks


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a bool mask as an 8-bit 0/255 PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_index_png(path: str | Path, values: np.ndarray) -> None:
    """Write a uint8 class-index image as a greyscale PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L").save(tmp, format="PNG")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary name keeps the file's suffixes, so libraries that pick a format from the name
    (nibabel's ``.nii.gz``) still work. Parent folders are created.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(
            "is a folder, so no file can be written under that name",
            path=path,
            fix="move that folder away, or write somewhere else.",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise DataError(
            "cannot create its folder: a file stands where a folder is needed",
            path=path,
            fix="move that file away, or write somewhere else.",
        ) from exc
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; exports follow the umask like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def common_root(paths: Sequence[Path]) -> Path | None:
    """The deepest folder that holds all ``paths`` (absolute), or None when there are none."""
    if not paths:
        return None
    parents = [str(Path(p).absolute().parent) for p in paths]
    return Path(os.path.commonpath(parents))


def image_names(folder: OutputFolder) -> dict[str, str]:
    """A '/'-separated name per key for tools that list images by file name.

    It is the image's path relative to the folder that holds all images (``a/scan 01.png``); a
    record with no image path gets ``<key>.png``.
    """
    paths = {r["key"]: Path(r["image"]) for r in folder.records if r.get("image")}
    root = common_root(list(paths.values()))
    names = {}
    for rec in folder.records:
        key = rec["key"]
        if key in paths and root is not None:
            names[key] = paths[key].absolute().relative_to(root).as_posix()
        else:
            names[key] = key + ".png"
    return names


def keys_from_names(names: Sequence[str]) -> list[str]:
    """pixelvote keys for image names: the file stem, or the sub-folder path when stems collide."""
    stems = [PurePosixPath(n.replace("\\", "/")).stem for n in names]
    out = []
    for name, stem in zip(names, stems, strict=True):
        if stems.count(stem) > 1:
            p = PurePosixPath(name.replace("\\", "/"))
            out.append(str(p.with_suffix("")).lstrip("/"))
        else:
            out.append(stem)
    return out
