"""One 2D NIfTI volume per image (``<key>.nii.gz``, class indices as in the ``png`` format).

Needs nibabel (``pip install nibabel``). The array is stored with axes (x = column, y = row), i.e.
the PNG mask transposed, the convention of nibabel and of MONAI's image readers; the affine is left
as the identity (1 mm pixels at the origin) because 2D images carry no spacing or orientation.
``NOTE.txt`` and ``classes.json`` beside the volumes say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pixelvote.errors import ConfigError
from pixelvote.export.outputs import OutputFolder, atomic_path, write_json, write_text
from pixelvote.export.png import classes_document, index_mask

NOTE = (
    "pixelvote NIfTI export\n"
    "- one 2D volume per image: <key>.nii.gz, uint8 class indices (see classes.json)\n"
    "- array axes are (x = image column, y = image row): the PNG mask transposed\n"
    "- the affine is the identity: 2D images carry no pixel spacing, origin or orientation,\n"
    "  so none is invented; set it yourself if your images have a known spacing\n"
)


def _nibabel():  # type: ignore[no-untyped-def]
    try:
        import nibabel
    except ImportError as exc:
        raise ConfigError(
            "the 'nifti' export format needs the optional package nibabel, which is not installed",
            fix="pip install nibabel",
        ) from exc
    return nibabel


def export_nifti(folder: OutputFolder, to: Path) -> Path:
    """Write ``to/<key>.nii.gz`` per image, ``classes.json`` and ``NOTE.txt``; returns ``to``."""
    nib = _nibabel()
    files = {}
    for rec in folder.records:
        rel = f"{rec['key']}.nii.gz"
        img = nib.Nifti1Image(np.ascontiguousarray(index_mask(folder, rec).T), affine=np.eye(4))
        img.header.set_xyzt_units("mm")
        with atomic_path(to / rel) as tmp:
            nib.save(img, str(tmp))
        files[rec["key"]] = rel
    write_json(to / "classes.json", classes_document(folder, files, "NIfTI-1, axes (x, y), identity affine"))
    write_text(to / "NOTE.txt", NOTE)
    return to


def read_nifti_mask(path: str | Path) -> np.ndarray:
    """Class-index array (height, width) of a volume written by :func:`export_nifti`."""
    nib = _nibabel()
    return np.asarray(nib.load(str(path)).dataobj).T
