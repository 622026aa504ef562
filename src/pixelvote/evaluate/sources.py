"""What an evaluation reads: labelled images with their truth (masks, TBX11K boxes, or none), the
run's split, a fingerprint of the files (so a metrics.json says exactly which data it describes), and
the decoding of each image with its truth at the original size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pixelvote.data import dataset as _ds
from pixelvote.data import tbx11k
from pixelvote.data.imageio import read_image, read_mask
from pixelvote.data.transforms import fit_image, to_tensor
from pixelvote.errors import ConfigError, DataError, did_you_mean
from pixelvote.evaluate.metrics import boxes_to_mask

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Split = Literal["val", "test", "all"]
SPLITS = ("val", "test", "excluded", "all")
SPLIT_LISTS = {"excluded": "excluded_from_training"}  # split name -> its list in split.json


@dataclass(frozen=True)
class EvalItem:
    """One image to evaluate. ``truth``: ``"mask"`` (a mask file), ``"boxes"`` (TB boxes in image pixels;
    none = empty truth) or ``"none"`` (classification only)."""

    path: Path
    rel: str  # posix path relative to the data root (the CSV's folder for a manifest)
    label: int  # index into the run's classes
    truth: Literal["mask", "boxes", "none"] = "none"
    mask: Path | None = None
    boxes: tuple[Box, ...] = ()
    annotation: Path | None = None
    key: str = ""  # the key `pixelvote annotate` gives the image (its stem unless stems collide)

    @property
    def seed(self) -> int:
        """Per-image MC seed, the same as `pixelvote annotate` uses, so both give the same masks."""
        return zlib.crc32((self.key or Path(self.rel).stem).encode("utf-8"))


@dataclass
class EvalSet:
    root: Path
    items: list[EvalItem]  # every labelled image found
    protocol: Literal["mask", "box", "none"]
    dataset: str
    notes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return os.path.relpath(path, base).replace(os.sep, "/")


def _class_index(label: str, classes: list[str], background: str, class_map: dict[str, str]) -> int:
    label = class_map.get(label, label)
    if label in classes:
        return classes.index(label)
    lower = {c.lower(): i for i, c in enumerate(classes)}
    if label.lower() in lower:
        return lower[label.lower()]
    if len(classes) == 2 and label.lower() in _ds.BACKGROUND_NAMES:
        return classes.index(background)
    raise DataError(f"the data has class {label!r}, which the run does not know: "
                    f"{did_you_mean(label, classes)}",
                    fix="rename the class folder, or pass --class-map '<data class>:<run class>' "
                        "(class_map= in Python)")


def _with_keys(items: list[EvalItem]) -> list[EvalItem]:
    """Give each item annotate's key: its stem, or its relative path without extension when stems collide."""
    stems = Counter(Path(i.rel).stem for i in items)
    no_ext = Counter(Path(i.rel).with_suffix("").as_posix() for i in items)
    out = []
    for i in items:
        key = Path(i.rel).stem
        if stems[key] > 1:
            key = Path(i.rel).with_suffix("").as_posix()
            if no_ext[key] > 1:
                key = i.rel
        out.append(EvalItem(i.path, i.rel, i.label, i.truth, i.mask, i.boxes, i.annotation, key))
    return out


def _folder_samples(root: Path) -> tuple[list[_ds.Sample], list[tuple[str, str]]]:
    try:
        ds = _ds.load_dataset(root)
        return ds.samples + ds.val + ds.test, ds.problems
    except DataError as exc:
        if "only one class" not in exc.problem:
            raise
    # a one-class set (e.g. lesions only) is fine to evaluate, though not to train on
    problems: list[tuple[str, str]] = []
    if root.is_file():
        return _ds._read_csv(root, None), problems
    images_dir, masks_dir = _ds._find_images_dir(root)
    samples, _ = _ds._scan_class_tree(images_dir, masks_dir, None, root, problems)
    return samples, problems


def _folder_set(root: Path, classes: list[str], background: str, class_map: dict[str, str]) -> EvalSet:
    samples, problems = _folder_samples(root)
    base = root.parent if root.is_file() else root
    items = [EvalItem(s.path, _rel(s.path, base), _class_index(s.label, classes, background, class_map),
                      "mask" if s.mask is not None else "none", s.mask) for s in samples]
    # an image of the background class without a mask file has an empty truth (nothing to find)
    any_mask = any(i.truth == "mask" for i in items)
    name = (root.stem if root.is_file() else root.name).lower()
    return EvalSet(root, items, "mask" if any_mask else "none", name,
                   skipped=[{"image": p, "reason": r} for p, r in problems])


def _tbx_samples(root: Path,
                 mapping: tbx11k.TBMapping) -> tuple[list[tbx11k.TBX11KSample], list[dict[str, str]]]:
    try:
        return tbx11k.list_samples(root, mapping=mapping), []
    except DataError:
        pass  # a broken file: list them one by one and skip the bad ones
    coco = tbx11k._coco_index(root)
    xml_dir = root / "annotations" / "xml"
    out, skipped = [], []
    for folder in sorted(p.name for p in (root / "imgs").iterdir() if p.is_dir()):
        if tbx11k._norm(folder) in tbx11k.UNLABELLED_FOLDERS:
            continue
        tb = mapping.is_tb_folder(folder)
        for path in sorted((root / "imgs" / folder).iterdir()):
            if path.suffix.lower() not in tbx11k.IMAGE_SUFFIXES or not path.is_file():
                continue
            try:
                out.append(tbx11k._sample(path, folder, tb, xml_dir, coco, "auto"))
            except DataError as exc:
                skipped.append({"image": str(path), "reason": str(exc)})
    return out, skipped


def _tbx_set(root: Path, classes: list[str], background: str, mapping: tbx11k.TBMapping,
             class_map: dict[str, str]) -> EvalSet:
    samples, skipped = _tbx_samples(root, mapping)
    bg = classes.index(background)
    notes = []
    if len(classes) == 2:
        fg = 1 - bg
        notes.append(f"TBX11K: TB images are scored as the run's class {classes[fg]!r} and non-TB images as "
                     f"{background!r} (binary mapping: TB folders {sorted(mapping.tb_folders)}).")
    items = []
    for s in samples:
        if len(classes) == 2:
            label = fg if s.tb else bg
        else:
            try:
                label = _class_index(s.folder, classes, background, class_map)
            except DataError:
                raise ConfigError(f"TBX11K folder {s.folder!r} matches none of the run's classes {classes}",
                                  fix="use a binary run, or pass --class-map '<folder>:<run class>' "
                                      "(class_map= in Python)") from None
        boxes: tuple[Box, ...] = ()
        if s.tb and s.annotation is None:
            truth = "none"  # a TB image without boxes: classification only
        else:
            truth, boxes = "boxes", tuple(mapping.foreground_boxes(s)) if s.tb else ()
        items.append(EvalItem(s.path, _rel(s.path, root), label, truth, None, boxes, s.annotation))  # type: ignore[arg-type]
    return EvalSet(root, items, "box", "tbx11k", notes=notes, skipped=skipped)


def list_items(data: str | Path, classes: list[str], background: str, *,
               mapping: tbx11k.TBMapping | None = None, class_map: dict[str, str] | None = None) -> EvalSet:
    """Every labelled image under ``data`` (class folders with optional masks, a CSV manifest, or a TBX11K
    root), labelled with the run's class indices."""
    root = Path(data)
    if not root.exists():
        raise DataError("data not found", path=root,
                        fix="pass a dataset folder, a CSV manifest or a TBX11K root")
    tbx_root = None
    if root.is_dir() and not (root / "images").is_dir():
        tbx_root = tbx11k.find_tbx11k_root(root)
    if tbx_root is not None:
        es = _tbx_set(tbx_root, classes, background, mapping or tbx11k.TBMapping(), class_map or {})
    else:
        es = _folder_set(root, classes, background, class_map or {})
    es.items = _with_keys(es.items)
    if not es.items:
        raise DataError("no labelled images found", path=root, fix="put images in images/<class>/")
    return es


def select_split(items: list[EvalItem], split: str | None, run_dir: Path, run_data_root: str | None,
                 data: Path) -> tuple[list[EvalItem], str, list[str]]:
    """The images to evaluate and the split actually used, with notes for the report.

    ``split=None``: ``"val"`` when ``data`` is the run's training data, else ``"all"``. ``"val"``/``"test"``
    use the run's split.json lists, matched by path relative to the data root (so a moved copy works);
    ``"excluded"`` the images ``train --train-exclude`` kept out of training, which calibration never saw
    either: a held-out set where a source was left out."""
    same = bool(run_data_root) and _same_path(data, str(run_data_root))
    if split is None:
        split = "val" if same else "all"
    if split not in SPLITS:
        raise ConfigError(f"unknown split: {did_you_mean(str(split), list(SPLITS))}")
    if split == "all":
        notes = ["Evaluated on every image of the data, including the images the models were trained on: the "
                 "figures are optimistic."] if same else []
        return items, split, notes
    path = run_dir / "split.json"
    try:
        lists = json.loads(path.read_text(encoding="utf-8"))
        wanted = [str(p) for p in lists[SPLIT_LISTS.get(split, split)]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"the run has no readable {split!r} list", path=path,
                        fix="pass --split all to evaluate every image of the data") from None
    seen = set(map(str, lists.get("calibration_masks", []))) if split == "excluded" else set()
    if seen and wanted:  # kept out of training, but their masks chose the run's recipe: not held out
        wanted = [p for p in wanted if p not in seen]
        if not wanted:
            raise DataError("calibration scored every image --train-exclude kept out of training", path=path,
                            fix="retrain with --calibration-per-group N (fewer per group) or "
                                "--no-calibrate-excluded to keep some held out")
    if not wanted:
        fix = ("train with --train-exclude to keep a source out of training, or pass --split val"
               if split == "excluded" else "pass --split all (or --split val)")
        raise DataError(f"the run's {split!r} list is empty", path=path, fix=fix)
    train_root = Path(str(run_data_root)) if run_data_root else data
    base = str(train_root.parent if train_root.suffix.lower() == ".csv" else train_root)
    rel = {os.path.relpath(p, base).replace(os.sep, "/") for p in wanted}
    absolute = {str(Path(p).resolve()) for p in wanted}
    chosen = [i for i in items if i.rel in rel or str(i.path.resolve()) in absolute]
    if not chosen:
        raise DataError(f"none of the run's {len(wanted)} {split!r} images are in this data", path=data,
                        fix="pass the run's training data, or --split all")
    unseen = ("the models were not trained on and calibration did not see (kept out by --train-exclude"
              + (f"; the {len(seen)} whose masks calibration scored are left out" if seen else "") + ")"
              if split == "excluded" else "the models were not trained on")
    notes = [f"Images: the run's {split!r} split ({len(chosen)} of {len(wanted)} listed images found), which "
             f"{unseen}."]
    if len(chosen) < len(wanted):
        missing = len(wanted) - len(chosen)
        notes.append(f"{missing} image(s) of the run's {split!r} list are not in this data.")
    return chosen, split, notes


def fingerprint(root: Path, items: list[EvalItem]) -> dict[str, object]:
    """sha256 over the sorted relative paths and byte sizes of every image and truth file read."""
    base = root.parent if root.is_file() else root
    entries = set()
    for it in items:
        for p in (it.path, it.mask, it.annotation):
            if p is None:
                continue
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            entries.add((_rel(p, base), size))
    h = hashlib.sha256()
    for rel, size in sorted(entries):
        h.update(f"{rel}\t{size}\n".encode())
    return {"sha256": h.hexdigest(), "files": len(entries), "bytes": sum(max(s, 0) for _, s in entries),
            "method": "sha256 over sorted 'relative path<TAB>size' lines of the images and truth files"}


class DecodeSet(torch.utils.data.Dataset):
    """Decode an image and its truth; errors are returned, never raised (bad files are skipped)."""

    def __init__(self, items: list[EvalItem], size: int, resize: str = "squash") -> None:
        self.items, self.size, self.resize = items, size, resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        try:
            img = read_image(it.path)
        except DataError as exc:
            return {"item": it, "error": str(exc)}
        h, w = img.shape[:2]
        truth, problem = None, None
        if it.truth == "mask" and it.mask is not None:
            try:
                truth = read_mask(it.mask, (w, h))
            except DataError as exc:
                problem = str(exc)
        elif it.truth == "boxes":
            truth = boxes_to_mask(list(it.boxes), (h, w)).numpy()
        x = fit_image(to_tensor(img), self.size, self.resize)
        return {"item": it, "image": img, "input": x, "truth": truth, "problem": problem}
