"""Label Studio tasks with pre-annotations (``predictions``) and the labelling config they need.

Each task holds one prediction: a ``brushlabels`` result (Label Studio's own brush RLE, see
:mod:`pixelvote.export.lsbrush`) when the mask is not empty, and a ``choices`` result with the
ensemble's diagnosis, so a reviewer can fix both. The prediction's ``score`` is the ensemble's
probability of its label, which Label Studio's data manager sorts by; tasks are written flagged
first, then least confident first. pixelvote's flags sit in the task ``data`` as columns.

Images are referenced through Label Studio's local-files server
(``/data/local-files/?d=<path relative to the document root>``) unless ``image_url_prefix`` is
given. The config (``<tasks stem>_config.xml``) is written beside the tasks file and says which
document root to start Label Studio with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from pixelvote.export.lsbrush import mask2rle
from pixelvote.export.outputs import OutputFolder, common_root, image_names, write_json, write_text

FROM_MASK = "mask"
FROM_DIAGNOSIS = "diagnosis"
TO_IMAGE = "image"
_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")


def config_path(tasks: Path) -> Path:
    """Where the labelling config of a tasks file goes."""
    return tasks.with_name(tasks.stem + "_config.xml")


def labeling_config(folder: OutputFolder, document_root: Path | None) -> str:
    """The Label Studio labelling config: the image, brush labels and a diagnosis choice."""
    classes = folder.classes
    labels = "\n".join(
        f"    <Label value={quoteattr(n)} background={quoteattr(_PALETTE[i % len(_PALETTE)])}/>"
        for i, n in enumerate(classes.foreground)
    )
    choices = "\n".join(f"    <Choice value={quoteattr(n)}/>" for n in classes.names)
    note = (
        "Images are referenced as /data/local-files/?d=PATH. Start Label Studio with "
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
        f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={document_root}"
        if document_root is not None
        else "Images are referenced by URL."
    )
    note = escape(note).replace("--", "- -")
    return (
        f"<!-- pixelvote review config. {note} -->\n"
        "<View>\n"
        f'  <Image name="{TO_IMAGE}" value="$image" zoom="true" zoomControl="true"/>\n'
        f'  <BrushLabels name="{FROM_MASK}" toName="{TO_IMAGE}">\n{labels}\n  </BrushLabels>\n'
        f'  <Header value="Diagnosis"/>\n'
        f'  <Choices name="{FROM_DIAGNOSIS}" toName="{TO_IMAGE}" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n"
        "</View>\n"
    )


def _result_id(key: str, what: str) -> str:
    return hashlib.sha1(f"{key}/{what}".encode()).hexdigest()[:10]


def build_tasks(
    folder: OutputFolder,
    *,
    image_url_prefix: str | None = None,
    model_version: str | None = None,
) -> tuple[list[dict[str, Any]], Path | None]:
    """The task list (flagged first, then by ascending score) and the local-files document root."""
    classes = folder.classes
    names = image_names(folder)
    paths = [Path(r["image"]) for r in folder.records if r.get("image")]
    root = None if image_url_prefix is not None else common_root(paths)
    version = model_version or f"pixelvote:{Path(str(folder.meta.get('run') or 'run')).name}"

    def order(rec: dict[str, Any]) -> tuple[int, float, str]:
        p = rec.get("probability")
        return (0 if rec.get("flagged") else 1, float(p) if p is not None else 0.0, rec["key"])

    tasks = []
    for rec in sorted(folder.records, key=order):
        key, w, h = rec["key"], rec["width"], rec["height"]
        if image_url_prefix is not None:
            url = image_url_prefix + quote(names[key])
        else:
            url = "/data/local-files/?d=" + quote(names[key])
        result: list[dict[str, Any]] = []
        mask = folder.load_mask(rec)
        if mask.any():
            result.append(
                {
                    "id": _result_id(key, FROM_MASK),
                    "from_name": FROM_MASK,
                    "to_name": TO_IMAGE,
                    "type": "brushlabels",
                    "original_width": w,
                    "original_height": h,
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": mask2rle(mask),
                        "brushlabels": [folder.mask_class(rec)],
                    },
                }
            )
        result.append(
            {
                "id": _result_id(key, FROM_DIAGNOSIS),
                "from_name": FROM_DIAGNOSIS,
                "to_name": TO_IMAGE,
                "type": "choices",
                "value": {"choices": [rec["label"]]},
            }
        )
        score = rec.get("probability")
        tasks.append(
            {
                "data": {
                    "image": url,
                    "pixelvote_key": key,
                    "pixelvote_image": rec.get("image"),
                    "pixelvote_width": w,
                    "pixelvote_height": h,
                    "pixelvote_classes": list(classes.names),
                    "pixelvote_background": classes.background,
                    "label": rec["label"],
                    "confidence": score,
                    "flagged": bool(rec.get("flagged", False)),
                    "reasons": ", ".join(rec.get("reasons", [])),
                    "agreement": rec.get("agreement"),
                    "uncertainty": rec.get("uncertainty_mean"),
                },
                "predictions": [
                    {
                        "model_version": version,
                        "score": float(score) if score is not None else 0.0,
                        "result": result,
                    }
                ],
            }
        )
    return tasks, root


def export_labelstudio(
    folder: OutputFolder,
    to: Path,
    *,
    image_url_prefix: str | None = None,
    model_version: str | None = None,
) -> Path:
    """Write the tasks JSON at ``to`` and its labelling config beside it."""
    tasks, root = build_tasks(folder, image_url_prefix=image_url_prefix, model_version=model_version)
    write_json(to, tasks, indent=None)
    write_text(config_path(to), labeling_config(folder, root))
    return to
