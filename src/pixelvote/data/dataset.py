"""Finding labelled images: a class-folder tree or a CSV manifest, and splitting them honestly."""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixelvote.data.imageio import is_image_file
from pixelvote.errors import DataError

log = logging.getLogger(__name__)

BACKGROUND_NAMES = ("normal", "healthy", "no_fire", "negative", "background", "not_tb")


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``mask`` is an optional ground-truth mask path, ``group`` keeps related images
    (frames of one video, scans of one patient) on one side of a split."""

    path: Path
    label: str
    mask: Path | None = None
    group: str = ""
    rel: str = ""  # path relative to the dataset root, for messages and output keys


@dataclass
class Dataset:
    root: Path
    samples: list[Sample]
    classes: list[str]
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while listing

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {k: c.get(k, 0) for k in self.classes}


def _walk_images(folder: Path) -> list[Path]:
    """Image files below ``folder``, sorted, following no symlink loops.

    A folder link to ``folder`` or one of its parents is a loop and is not followed (it would pull in
    sibling class folders). A file link that leads nowhere is listed, so that reading it reports it."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    top = folder.resolve()
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        if d.is_symlink() and top.is_relative_to(d.resolve()):
            log.warning("%s: link to a parent folder (a loop); not followed", d)
            continue
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            log.warning("%s: cannot list folder (%s); skipped", d, exc)
            continue
        for p in entries:
            if p.name.startswith("."):
                continue
            try:
                if p.is_dir():
                    stack.append(p)
                elif is_image_file(p) and (p.is_file() or (p.is_symlink() and not p.exists())):
                    out.append(p)
            except OSError:
                continue
    return sorted(out)


def group_match(name: str, pattern: re.Pattern[str]) -> str | None:
    """The group ``pattern`` (``--group-pattern``: its first group, else the whole match) finds in a file
    name, or None where it matches nothing."""
    m = pattern.search(name)
    if not m:
        return None
    return m.group(1) if m.groups() else m.group(0)


def _group_of(path: Path, pattern: re.Pattern[str] | None) -> str:
    return (group_match(path.name, pattern) if pattern is not None else None) or path.stem


def compile_pattern(pattern: str, option: str = "--group-pattern") -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DataError(f"{option} {pattern!r} is not a valid regular expression ({exc})",
                        fix="use a Python regex such as '^(Video\\d+)'") from exc


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return compile_pattern(pattern) if pattern else None


def _scan_class_tree(images_dir: Path, masks_dir: Path | None, pattern: re.Pattern[str] | None,
                     root: Path, problems: list[tuple[str, str]]) -> tuple[list[Sample], list[str]]:
    class_dirs = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples: list[Sample] = []
    classes: list[str] = []
    for cdir in class_dirs:
        files = _walk_images(cdir)
        if not files:
            problems.append((str(cdir), "class folder holds no images (PNG/JPEG/BMP/TIFF); class ignored"))
            log.warning("%s: class folder holds no images; the class is ignored", cdir)
            continue
        classes.append(cdir.name)
        for f in files:
            mask = None
            if masks_dir is not None:
                rel_parent = f.parent.relative_to(images_dir)
                cand = masks_dir / rel_parent / (f.stem + ".png")
                if cand.exists():
                    mask = cand
            samples.append(Sample(f, cdir.name, mask, _group_of(f, pattern), str(f.relative_to(root))))
    return samples, classes


def _find_images_dir(folder: Path) -> tuple[Path, Path | None]:
    if (folder / "images").is_dir():
        masks = folder / "masks"
        return folder / "images", (masks if masks.is_dir() else None)
    return folder, None


def _read_csv(path: Path, pattern: re.Pattern[str] | None) -> list[Sample]:
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise DataError(f"CSV header is {reader.fieldnames} but needs at least 'path' and 'label'",
                                path=path, fix="write a header line 'path,label[,mask][,group]'")
            samples = []
            for i, row in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                if not row.get("path") or not row.get("label"):
                    raise DataError(f"line {i} has an empty path or label", path=path,
                                    fix="fill in both columns or delete the line")
                p = Path(row["path"])
                p = p if p.is_absolute() else base / p
                m = row.get("mask") or ""
                mp = None if not m else (Path(m) if Path(m).is_absolute() else base / m)
                group = row.get("group") or _group_of(p, pattern)
                samples.append(Sample(p, row["label"], mp, group, row["path"]))
    except UnicodeDecodeError as exc:
        raise DataError("CSV manifest is not UTF-8 text", path=path, fix="save it as UTF-8 CSV") from exc
    return samples


def load_dataset(data: str | Path, *, group_pattern: str | None = None) -> Dataset:
    """List a dataset: ``DIR/images/<class>/...`` (+ ``DIR/masks/<class>/<stem>.png``), or a class-folder
    tree directly, or a CSV manifest ``path,label[,mask][,group]``. Optional ``DIR/val`` and ``DIR/test``
    hold the same layout and are used instead of a random split."""
    root = Path(data)
    pattern = _compile(group_pattern)
    problems: list[tuple[str, str]] = []
    if not root.exists():
        raise DataError("dataset not found", path=root,
                        fix="pass a folder with images/<class>/<file> or a CSV manifest path,label[,mask]")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError("expected a folder or a .csv manifest", path=root,
                            fix="pass the dataset folder, or a CSV with columns path,label[,mask][,group]")
        samples = _read_csv(root, pattern)
        classes = sorted({s.label for s in samples})
        return _finish(Dataset(root, samples, classes, problems=problems))

    from pixelvote.data import tbx11k

    if tbx11k.is_tbx11k_root(root):
        return _finish(_load_tbx11k(root, problems))

    split_dirs = {n: root / n for n in ("train", "val", "test") if (root / n).is_dir()}
    main = split_dirs.get("train", root)
    images_dir, masks_dir = _find_images_dir(main)
    samples, classes = _scan_class_tree(images_dir, masks_dir, pattern, root, problems)
    ds = Dataset(root, samples, classes, problems=problems)
    for name in ("val", "test"):
        if name in split_dirs:
            idir, mdir = _find_images_dir(split_dirs[name])
            extra, _ = _scan_class_tree(idir, mdir, pattern, root, problems)
            unknown = sorted({s.label for s in extra} - set(classes))
            if unknown:
                raise DataError(f"{name}/ has classes {unknown} that the training images do not have",
                                path=split_dirs[name], fix="use the same class folder names in every split")
            setattr(ds, name, extra)
    return _finish(ds)


def _load_tbx11k(root: Path, problems: list[tuple[str, str]]) -> Dataset:
    """A TBX11K root (imgs/<class>/, annotations/xml): binary TB vs not TB; boxes are for evaluation."""
    from pixelvote.data import tbx11k

    samples = [Sample(s.path, "tb" if s.tb else "not_tb", None, s.path.stem, str(s.path.relative_to(root)))
               for s in tbx11k.list_samples(root)]
    classes = sorted({s.label for s in samples})
    return Dataset(root, samples, classes, problems=problems)


def _finish(ds: Dataset) -> Dataset:
    if not ds.samples:
        raise DataError("no images found", path=ds.root,
                        fix="put images in images/<class>/ (PNG, JPEG, BMP or TIFF) or list them in a CSV")
    if len(ds.classes) < 2:
        fix = ("add a folder of images with the finding beside it (e.g. images/lesion/)"
               if ds.classes and ds.classes[0].lower() in BACKGROUND_NAMES else
               "add a background class folder (e.g. images/normal/) with negatives")
        raise DataError(f"only one class found ({ds.classes}); a classifier needs at least two",
                        path=ds.root, fix=fix)
    return ds


def resolve_background(classes: list[str], background: str | None) -> str:
    """The background (no-finding) class: the one named, or a conventional name, else a clear error."""
    if background:
        if background not in classes:
            from pixelvote.errors import did_you_mean

            raise DataError(f"unknown background class: {did_you_mean(background, classes)}",
                            fix="pass --background with one of the class folder names")
        return background
    found = [c for c in classes if c.lower() in BACKGROUND_NAMES]
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"cannot tell which class is the background (healthy / no finding) among {classes}",
        fix=f"pass --background CLASS (by default a class named one of {', '.join(BACKGROUND_NAMES)} "
            "is used)",
    )


def split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified split that keeps each group on one side (frames of a video, scans of a patient)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1) but got {val_fraction}",
                        fix="pass e.g. --val-fraction 0.2")
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group or s.rel or str(s.path) for s in samples])
    n_groups = len(set(groups.tolist()))
    counts = Counter(labels.tolist())
    rare = [c for c, n in counts.items() if n < 2]
    if rare:
        raise DataError(f"class(es) {rare} have a single image, too few to split into training and "
                        "validation",
                        fix="add images to those classes, or provide a val/ folder")
    n_splits = max(2, min(round(1.0 / val_fraction), n_groups, min(counts.values())))
    if n_groups < 2:
        raise DataError("all images belong to one group, so no validation split is possible",
                        fix="check --group-pattern, or provide a val/ folder")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when a class has fewer members than n_splits
        train_idx, val_idx = next(cv.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]
