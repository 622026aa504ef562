"""Export an annotation output folder to annotation tools, and import corrected annotations back.

``export_annotations(out_dir, fmt, to)`` writes one of :data:`FORMATS`;
``import_annotations(fmt, src, to)`` reads one of :data:`IMPORT_FORMATS` into a new output folder.
See ``docs/exports.md``. Tool libraries (pycocotools, nibabel) are imported only when used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pixelvote.data.imageio import file_above
from pixelvote.errors import ConfigError, did_you_mean

FORMATS: dict[str, str] = {
    "coco": "COCO instances JSON, masks as compressed RLE (pycocotools), pixelvote flags in 'attributes'",
    "coco-results": "COCO results list (image_id, category_id, segmentation, score) for COCOeval",
    "labelstudio": "Label Studio tasks JSON with brush predictions, plus <stem>_config.xml",
    "cvat": "CVAT for images 1.1 XML (.xml, or .zip holding annotations.xml), plus <stem>_labels.json",
    "monailabel": "MONAI Label datastore folder: images, labels/original/, datastore_v2.json",
    "png": "folder of class-index PNG masks (masks/<key>.png) and classes.json",
    "nifti": "folder of 2D NIfTI class-index volumes (<key>.nii.gz); needs nibabel",
}
FOLDER_FORMATS = ("monailabel", "png", "nifti")  # the others write one file (plus sidecars beside it)
_FILE_SUFFIX = {"coco": ".json", "coco-results": ".json", "labelstudio": ".json", "cvat": ".xml"}
IMPORT_FORMATS: dict[str, str] = {
    "coco": "COCO instances JSON (polygons, RLE or compressed RLE)",
    "labelstudio": "Label Studio JSON export (tasks with submitted annotations)",
}


def _exporter(fmt: str) -> Callable[..., Path]:
    if fmt == "coco":
        from pixelvote.export.coco import export_coco

        return export_coco
    if fmt == "coco-results":
        from pixelvote.export.coco import export_coco_results

        return export_coco_results
    if fmt == "labelstudio":
        from pixelvote.export.labelstudio import export_labelstudio

        return export_labelstudio
    if fmt == "cvat":
        from pixelvote.export.cvat import export_cvat

        return export_cvat
    if fmt == "monailabel":
        from pixelvote.export.monailabel import export_monailabel

        return export_monailabel
    if fmt == "png":
        from pixelvote.export.png import export_png

        return export_png
    from pixelvote.export.nifti import export_nifti

    return export_nifti


def _check_options(fmt: str, func: Callable[..., Path], options: dict[str, Any]) -> None:
    import inspect

    allowed = [p.name for p in inspect.signature(func).parameters.values() if p.kind is p.KEYWORD_ONLY]
    for name in options:
        if name not in allowed:
            raise ConfigError(
                f"format {fmt!r} has no option {name!r}; "
                + (did_you_mean(name, allowed) if allowed else "it takes no options."),
            )


def export_annotations(out_dir: str | Path, fmt: str, to: str | Path, *, skip_bad: bool = False,
                       **options: Any) -> Path:
    """Export the annotation output folder ``out_dir`` as ``fmt`` to ``to``; returns the main path written.

    ``to`` is a file for ``coco``, ``coco-results``, ``labelstudio`` and ``cvat`` and a folder for
    ``monailabel``, ``png`` and ``nifti``. Options: ``coco_gt`` (``coco-results``: number images and
    categories as this COCO file does), ``image_url_prefix`` and ``model_version`` (``labelstudio``).
    Raises :class:`~pixelvote.errors.ConfigError` for an unknown format or option and
    :class:`~pixelvote.errors.DataError` for a missing or corrupt output folder. With ``skip_bad`` a record
    whose mask is missing, unreadable or of the wrong size is left out and listed in the skip report
    (see :func:`skipped_report_path`) instead of stopping the export. A ``to`` that is ``out_dir`` itself
    or one of its own files or folders (``annotations.jsonl``, ``masks/``, ...) is refused, so an export
    never overwrites its source.
    """
    if fmt not in FORMATS:
        raise ConfigError(
            f"unknown export format: {did_you_mean(fmt, list(FORMATS))}",
            fix="pick one of the listed formats.",
        )
    from pixelvote.export.outputs import open_output

    exporter = _exporter(fmt)
    _check_options(fmt, exporter, options)
    # standard library only; no-op without OUT/review.sqlite
    from pixelvote.review.apply import reviewed_records

    folder = open_output(out_dir)
    check_target(folder.root, to, fmt)
    folder.records = reviewed_records(folder.root, folder.records, folder.classes.names)
    skipped: list[dict[str, str]] = []
    if skip_bad:
        folder.records, skipped = _usable_records(folder)
    path = exporter(folder, Path(to), **options)
    report = skipped_report_path(to, fmt)
    if skipped:
        from pixelvote.export.outputs import write_text

        write_text(report, "".join(json.dumps(s) + "\n" for s in skipped))
    else:
        report.unlink(missing_ok=True)
    return path


def skipped_report_path(to: str | Path, fmt: str) -> Path:
    """Where an export lists the records it left out.

    Inside a folder target: ``<to>/skipped.jsonl``. Beside a file target: ``<stem>_skipped.jsonl``
    (like the ``<stem>_config.xml`` and ``<stem>_labels.json`` sidecars), never a plain
    ``skipped.jsonl``, which would overwrite or delete the list ``pixelvote annotate`` keeps in its
    output folder.
    """
    to = Path(to)
    return to / "skipped.jsonl" if fmt in FOLDER_FORMATS else to.parent / f"{to.stem}_skipped.jsonl"


# What ``pixelvote annotate`` and the review desk keep in an output folder (docs/formats.md).
SOURCE_ENTRIES = (
    "annotate.json",
    "annotations.jsonl",
    "skipped.jsonl",
    "masks",
    "overlays",
    "uncertainty",
    "review.sqlite",
    "review.sqlite-wal",
    "review.sqlite-shm",
    ".annotate.lock",
)


def check_target(source: str | Path, to: str | Path, fmt: str) -> None:
    """Refuse an export target that would overwrite the source folder or cannot be written.

    Raises :class:`~pixelvote.errors.ConfigError` when ``to`` is the source folder, one of its own
    files or folders (:data:`SOURCE_ENTRIES`) or anything inside those; when ``to`` is an existing
    folder but ``fmt`` writes a file, or an existing file but ``fmt`` writes a folder; or when a
    folder above ``to`` is a file. A new file or folder inside the source folder is fine.
    """
    source, to = Path(source), Path(to)
    src_abs, to_abs = source.resolve(), to.resolve()
    if to_abs == src_abs:
        raise ConfigError(
            "--to is the --from folder itself; exporting there would overwrite the annotation output",
            path=to,
            fix=f"pass a new path with --to, e.g. {_example(source, fmt)}.",
        )
    for name in SOURCE_ENTRIES:
        entry = src_abs / name
        if to_abs == entry or entry in to_abs.parents:
            where = "is" if to_abs == entry else "is inside"
            raise ConfigError(
                f"--to {where} the --from folder's own {name}; exporting there would overwrite it",
                path=to,
                fix=f"pass a new path with --to, e.g. {_example(source, fmt)}.",
            )
    blocker = file_above(to)
    if blocker is not None:
        raise ConfigError(
            f"cannot write --to there: {blocker} is a file, not a folder",
            path=to,
            fix="pass a --to path whose folders are folders (or do not exist yet).",
        )
    if fmt in FOLDER_FORMATS and to.exists() and not to.is_dir():
        raise ConfigError(
            f"is a file, but --format {fmt} writes a folder",
            path=to,
            fix="pass a new or existing folder with --to.",
        )
    if fmt not in FOLDER_FORMATS and to.is_dir():
        raise ConfigError(
            f"is a folder, but --format {fmt} writes a file",
            path=to,
            fix=f"pass a file path with --to, e.g. {to / (fmt + _FILE_SUFFIX.get(fmt, '.json'))}.",
        )


def _example(source: Path, fmt: str) -> Path:
    """A --to suggestion: a new file (or folder) beside the source's own files."""
    return source / (f"{fmt}-export" if fmt in FOLDER_FORMATS else fmt + _FILE_SUFFIX.get(fmt, ".json"))


def _usable_records(folder: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Records whose mask reads and has the image's size; the others, with the reason, to report."""
    from pixelvote.errors import DataError

    good, skipped = [], []
    for rec in folder.records:
        try:
            folder.load_mask(rec)
        except DataError as exc:
            skipped.append({"image": str(folder.mask_path(rec)), "reason": str(exc)})
            continue
        good.append(rec)
    return good, skipped


def import_annotations(fmt: str, src: str | Path, to: str | Path, **options: Any) -> Path:
    """Import corrected annotations ``src`` (a ``fmt`` file) into a new output folder ``to``; return ``to``.

    Records are marked ``"reviewed": true`` and ``"source": fmt``. Option: ``background`` (the
    background class name when the file does not say; default "background").
    """
    if fmt not in IMPORT_FORMATS:
        raise ConfigError(
            f"unknown import format: {did_you_mean(fmt, list(IMPORT_FORMATS))}",
            fix="pick one of the listed formats.",
        )
    from pixelvote.export.importers import IMPORTERS

    _check_options(fmt, IMPORTERS[fmt], options)
    return IMPORTERS[fmt](src, to, **options)


__all__ = ["FORMATS", "IMPORT_FORMATS", "check_target", "export_annotations", "import_annotations",
           "skipped_report_path"]
