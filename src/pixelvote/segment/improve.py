"""`pixelvote improve`: annotate -> review -> retrain the segmenter -> re-annotate, with an IoU log per round.

Reviews come from records marked ``"reviewed": true`` in the round's ``annotations.jsonl`` (written by
`pixelvote import` or the review desk), or are simulated from ground-truth masks (``truth=DATA``): the
``review_fraction`` most uncertain images that have a truth mask get that mask as the reviewer's correction.
The IoU logged per round is measured on images with a truth mask that were *not* reviewed, so the gain is
not the reviewed images scoring themselves.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pixelvote.data.imageio import read_jsonl, read_mask, write_json_atomic, write_png_atomic

log = logging.getLogger(__name__)


def _truth_mask(image: Path, truth: Path) -> Path | None:
    label = image.parent.name
    cand = truth / "masks" / label / (image.stem + ".png")
    return cand if cand.exists() else None


def simulate_review(annotations: Path, truth: Path, fraction: float, background: str) -> int:
    """Mark the most uncertain images with a truth mask as reviewed, with the truth as the correction."""
    recs = list(read_jsonl(annotations / "annotations.jsonl"))
    candidates = [r for r in recs if Path(r["image"]).parent.name != background
                  and _truth_mask(Path(r["image"]), truth) is not None]
    candidates.sort(key=lambda r: (not r["flagged"], r["probability"]))
    chosen = {r["image"] for r in candidates[: int(round(fraction * len(candidates)))]}
    for r in recs:
        if r["image"] in chosen:
            img = Path(r["image"])
            tm = _truth_mask(img, truth)
            assert tm is not None
            m = read_mask(tm, (r["width"], r["height"]))
            write_png_atomic(annotations / r["mask"], (m * 255).astype(np.uint8))
            r.update(reviewed=True, source="simulated", label=img.parent.name, flagged=False, reasons=[],
                     mask_area=int(m.sum()))
    tmp = annotations / "annotations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(annotations / "annotations.jsonl")
    return len(chosen)


def score(annotations: Path, truth: Path, background: str) -> dict[str, Any]:
    """Mean IoU of the written masks against truth masks, on images that were not reviewed."""
    ious = []
    for r in read_jsonl(annotations / "annotations.jsonl"):
        img = Path(r["image"])
        tm = _truth_mask(img, truth)
        if r.get("reviewed") or tm is None or img.parent.name == background:
            continue
        t = read_mask(tm, (r["width"], r["height"]))
        p = read_mask(annotations / r["mask"])
        u = (t | p).sum()
        ious.append(float((t & p).sum() / u) if u else 1.0)
    return {"images": len(ious), "mean_iou": float(np.mean(ious)) if ious else None}


def improve(run: str | Path, images: str | Path, work: str | Path, *, rounds: int = 1,
            truth: str | Path | None = None, review_fraction: float = 0.2, seg_epochs: int = 30,
            image_size: int | None = None, device: str | None = None,
            seg_decoder: str = "light", method: str = "best", labels: bool = False,
            seg_members: int = 1) -> list[dict[str, Any]]:
    from pixelvote.engine.annotate import annotate
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.segment.train import SegConfig, decoder_settings, segmenter_size, train_segmenter

    decoder = decoder_settings(seg_decoder)

    run, images, work = Path(run), Path(images), Path(work)
    rc = read_run_config(run)
    size = image_size or segmenter_size(rc.image_size)
    truth_p = Path(truth) if truth else None
    history: list[dict[str, Any]] = []
    segmenter: Path | None = None
    prev_reviewed: list[dict[str, Any]] = []
    for rnd in range(rounds + 1):
        out = work / f"round{rnd}" / "annotations"
        if not (out / "annotations.jsonl").exists():
            # round 0's consensus masks are what the first segmenter learns from: the best recipe, not the
            # cheapest (later rounds take their masks from the segmenter)
            annotate(run, images, out, segmenter=segmenter, device=device, method=method, labels=labels)
            _carry_reviews(out, prev_reviewed)
        entry: dict[str, Any] = {"round": rnd, "masks_from": "segmenter" if segmenter else "consensus"}
        if segmenter is not None:  # chosen on the run's validation masks, which --truth may score again
            scfg = json.loads((segmenter / "segmenter.json").read_text())
            entry["segmenter_thresholds"] = {k: scfg.get(k) for k in (
                "threshold", "crf_threshold", "crf_iterations", "crf_cutoff", "use_crf", "threshold_source")}
        if truth_p is not None:
            entry["validation"] = score(out, truth_p, rc.background)
        history.append(entry)
        log.info("round %d: %s", rnd, entry)
        write_json_atomic(work / "improve_log.json", history)
        if rnd == rounds:
            break
        if truth_p is not None and not any(r.get("reviewed") for r in read_jsonl(out / "annotations.jsonl")):
            entry["simulated_reviews"] = simulate_review(out, truth_p, review_fraction, rc.background)
            entry["validation"] = score(out, truth_p, rc.background)  # the same unreviewed images as later
        prev_reviewed = [r for r in read_jsonl(out / "annotations.jsonl") if r.get("reviewed")]
        for r in prev_reviewed:
            r["_mask_file"] = str(out / r["mask"])
        entry["reviewed"] = len(prev_reviewed)
        segmenter = work / f"round{rnd}" / "segmenter"
        if not (segmenter / "segmenter.json").exists():
            seg_cfg = SegConfig(epochs=seg_epochs, image_size=size, **decoder)
            if seg_members > 1:  # seg_members segmenters, combined (segment train --members)
                from pixelvote.segment.combine import train_combined

                train_combined(out, segmenter, seg_members, run=run, cfg=seg_cfg, device=device)
            else:
                train_segmenter(out, segmenter, run=run, cfg=seg_cfg, device=device)
        write_json_atomic(work / "improve_log.json", history)
    return history


def _carry_reviews(out: Path, reviewed: list[dict[str, Any]]) -> None:
    """Reviewed masks replace what the new round predicted for the same images."""
    if not reviewed:
        return
    by_image = {r["image"]: r for r in reviewed}
    recs = list(read_jsonl(out / "annotations.jsonl"))
    for r in recs:
        old = by_image.get(r["image"])
        if old is None:
            continue
        shutil.copyfile(old["_mask_file"], out / r["mask"])
        r.update({k: v for k, v in old.items() if k not in ("_mask_file", "mask", "overlay", "uncertainty")})
    tmp = out / "annotations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(out / "annotations.jsonl")
