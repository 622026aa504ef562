"""Let the run's validation masks set the segmenter's thresholds, as ``train`` does for the ensemble's.

The segmenter's probability is not calibrated to the truth: on the fire validation frames its own masks
scored best thresholded at 0.95, and its dense CRF best with 0.05, not 0.5, as the undecided probability
(on BUSI: 0.3 and 0.05).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pixelvote.errors import DataError
from pixelvote.refine.crf import CRFConfig

# the segmenter's dense CRF: mean-field iterations tried by default (each is a CRF pass per threshold; none
# costs more than the consensus CRF's default 5) and cutoffs on the refined probability (free: one pass
# serves all). BUSI's masks were best after 2 iterations, fire's after 10-20, and both with a cutoff
# below 0.5 (docs/results.md)
CRF_ITERATIONS = (2, 3, 5)
CRF_CUTOFFS = (0.1, 0.3, 0.5)


def iteration_candidates(crf_cfg: CRFConfig | None,
                         requested: tuple[int, ...] = CRF_ITERATIONS) -> tuple[int, ...]:
    """The CRF iteration counts calibration tries: ``requested`` and always the run's own."""
    return tuple(sorted({*requested, *([crf_cfg.iterations] if crf_cfg else [])}))


def iou_rows(prob: torch.Tensor, images: torch.Tensor, truths: list[torch.Tensor],
             to_truth: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], crf_cfg: CRFConfig | None,
             iterations: tuple[int, ...] = CRF_ITERATIONS, cutoffs: tuple[float, ...] = CRF_CUTOFFS,
             ) -> tuple[torch.Tensor, dict[tuple[int, float], torch.Tensor]]:
    """Per-image IoU ``(B, len(GRID))`` of the segmenter's probability ``prob (B, S, S)`` with each truth
    (the score placed on the truth by ``to_truth(score, truth)``) at each threshold of
    :data:`pixelvote.evaluate.selection.GRID`; and with ``crf_cfg``, by ``(iterations, cutoff)``, of its
    dense-CRF refinement after that many iterations with each threshold as the unary's undecided
    probability and the mask where the refined probability exceeds the cutoff (empty without ``crf_cfg``).
    As in calibration, the CRF only runs up to
    :data:`~pixelvote.evaluate.selection.REFINED_MAX_THRESHOLD` (NaN above: it was never best there)."""
    from pixelvote.evaluate.selection import GRID, iou_over_grid, refined_at

    plain = torch.stack([iou_over_grid(to_truth(prob[j], t), t, GRID) for j, t in enumerate(truths)])
    if crf_cfg is None:
        return plain, {}
    from pixelvote.refine.crf import crf_colours, dense_crf, reuse

    nan = torch.tensor(float("nan"))
    refined: dict[tuple[int, float], torch.Tensor] = {}
    colours = crf_colours(images, prob.shape[-2:], crf_cfg)  # the iterations do not change the CRF's size
    with reuse():  # one CRF per image and iteration count, every threshold run on it
        for n in iterations:
            settings = crf_cfg.model_copy(update={"iterations": n})
            qs = [dense_crf(prob, None, settings, threshold=t, colours=colours) if refined_at(t) else None
                  for t in GRID]
            for c in cutoffs:
                refined[(n, c)] = torch.stack([torch.stack([
                    nan if q is None else iou_over_grid(to_truth(q[j] - c, t), t, (0.0,))[0] for q in qs])
                    for j, t in enumerate(truths)])
    return plain, refined


def validation_samples(run: str | Path) -> tuple[list[Any], list[str], str]:
    """The run's validation images (with their masks, where the data has them), its classes and background;
    raises DataError when the run's data cannot be read."""
    from pixelvote.data.dataset import load_dataset
    from pixelvote.models.checkpoint import read_run_config

    run = Path(run)
    rc = read_run_config(run)
    root = rc.data.get("root")
    if not root:
        raise DataError("the run does not say where its data is", path=run / "run.json",
                        fix="train the run with this version of pixelvote")
    try:
        wanted = {str(Path(p).resolve()) for p in json.loads((run / "split.json").read_text())["val"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise DataError("the run has no readable validation list", path=run / "split.json",
                        fix="train the run again; split.json is written by `pixelvote train`") from None
    ds = load_dataset(root, group_pattern=rc.train.get("group_pattern"))
    samples = [s for s in [*ds.samples, *ds.val, *ds.test] if str(s.path.resolve()) in wanted]
    return samples, rc.classes, rc.background


def choose_thresholds(model: Any, run: str | Path, *, image_size: int, resize: str,
                      crf_cfg: CRFConfig | None, batch_size: int = 16,
                      crf_iterations: tuple[int, ...] = CRF_ITERATIONS) -> dict[str, Any]:
    """Score the segmenter on the run's validation images that show a finding and have a mask, as
    :func:`iou_rows` does (the CRF after each of ``crf_iterations``). Returns a summary with the best
    ``threshold``; the best CRF setting's ``crf_threshold``, ``crf_iterations`` and ``crf_cutoff`` (None
    where there was nothing to score); the mean IoU per threshold (``plain``; ``crf``: at the chosen
    iterations and cutoff) and each CRF setting's best (``crf_settings``)."""
    from tqdm.auto import tqdm

    from pixelvote.evaluate.selection import GRID, at_size
    from pixelvote.segment.train import predict
    from pixelvote.train.cache import cache_samples

    samples, classes, background = validation_samples(run)
    samples = [s for s in samples if s.mask is not None and s.label != background]
    summary: dict[str, Any] = {"images": 0, "threshold": None, "crf_threshold": None}
    if not samples:
        return summary
    # scored at each image's own size, as the ensemble's calibration scores its masks
    val = cache_samples(samples, classes, image_size, desc="scoring the segmenter", resize=resize,
                        full_masks=True)
    iterations = iteration_candidates(crf_cfg, crf_iterations)
    plain_rows: list[torch.Tensor] = []
    crf_rows: dict[tuple[int, float], list[torch.Tensor]] = {}
    for imgs, truths in tqdm(_batches(val, batch_size), desc="choosing the segmenter's thresholds",
                             total=-(-len(val) // batch_size), unit="batch", leave=False):
        prob = predict(model, imgs).float().cpu()
        plain, refined = iou_rows(prob, imgs, truths, lambda s, t: at_size(s, t, resize), crf_cfg,
                                  iterations=iterations)
        plain_rows.append(plain)
        for key, rows in refined.items():
            crf_rows.setdefault(key, []).append(rows)
    if not plain_rows:
        return summary
    mean = torch.cat(plain_rows).mean(0)
    summary.update({"plain": _by_threshold(GRID, mean), "threshold": GRID[int(mean.argmax())],
                    "threshold_iou": round(float(mean.max()), 4)})
    if crf_rows:
        # NaN: the CRF was not run at that threshold. Candidates run from the cheapest (fewest
        # iterations), so a tie keeps the cheaper setting
        means = {key: torch.cat(rows).mean(0).nan_to_num(-1.0) for key, rows in crf_rows.items()}
        best = max(means, key=lambda k: float(means[k].max()))
        summary.update({"crf": _by_threshold(GRID, means[best]),
                        "crf_threshold": GRID[int(means[best].argmax())],
                        "crf_threshold_iou": round(float(means[best].max()), 4), "crf_iterations": best[0],
                        "crf_cutoff": best[1],
                        "crf_settings": {f"{n} iterations, cutoff {c}": round(float(m.max()), 4)
                                         for (n, c), m in means.items()}})
    summary["images"] = len(val)
    return summary


def _by_threshold(grid: tuple[float, ...], ious: torch.Tensor) -> dict[str, float]:
    return {str(t): round(float(v), 4) for t, v in zip(grid, ious, strict=True) if v >= 0}


def _batches(val: Any, bs: int) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    for i in range(0, len(val), bs):
        yield val.images[i:i + bs], [val.truth(j) for j in range(i, min(i + bs, len(val)))]
