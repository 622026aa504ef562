"""Self-training: the segmenter relabels its own unreviewed training images, and a fresh one learns from that.

The first segmenter already averages out much of the per-image CAM noise; its masks (refined by the dense CRF
where available) are better pseudo-labels than the consensus masks it learned from. Reviewed masks and
background negatives stay as they are. An image whose new mask overlaps its consensus mask by less than
``min_iou`` is dropped, as `annotate --segmenter` would flag it (``segmenter_disagrees``).
"""

from __future__ import annotations

import logging

import torch

from pixelvote.segment.data import SegDataset

log = logging.getLogger(__name__)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@torch.no_grad()
def relabel(model: torch.nn.Module, ds: SegDataset, *, threshold: float, crf: bool, min_iou: float = 0.2,
            batch_size: int = 8) -> dict[str, int]:
    """Replace, in ``ds``, the pseudo-mask of every unreviewed foreground example by ``model``'s mask; drop
    those where it disagrees with the old one. Returns counts of relabelled and dropped examples."""
    from pixelvote.segment.train import predict

    model.eval()
    todo = [i for i, ex in enumerate(ds.examples) if ex.mask is not None and not ex.reviewed]
    dropped: set[int] = set()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        x = torch.stack([ds.base(i)[0] for i in chunk])
        prob = predict(model, x).cpu()
        if crf:
            from pixelvote.refine.crf import dense_crf

            new = dense_crf(prob, x, threshold=threshold) > 0.5
        else:
            new = prob > threshold
        for i, mask in zip(chunk, new, strict=True):
            if _iou(mask, ds.base(i)[1] > 0) < min_iou:
                dropped.add(i)
            else:
                ds.set_target(i, mask)
    ds.keep([i for i in range(len(ds.examples)) if i not in dropped])
    counts = {"relabelled": len(todo) - len(dropped), "dropped": len(dropped)}
    log.info("self-training: %(relabelled)d masks relabelled by the segmenter, %(dropped)d dropped", counts)
    return counts
