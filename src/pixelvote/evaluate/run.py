"""`pixelvote evaluate`: score a trained run on labelled images and write metrics.json + report.html.

Images stream through the ensemble in batches; only summable state is kept (``PixelStats``,
``SweepStats``, per-image scalars) plus a bounded gallery, so memory does not grow with the data.
Masks are scored at each image's ORIGINAL size: the consensus margin and the members' maps are resized
bilinearly to the image, exactly as ``pixelvote annotate`` does, and the same per-image MC seeds are used,
so ``annotate`` writes the very masks that are scored here. Conventions: docs/evaluation.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pixelvote.consensus import ConsensusConfig, ConsensusResult, apply_consensus
from pixelvote.data.imageio import check_out_dir, image_size
from pixelvote.data.tbx11k import TBMapping
from pixelvote.data.transforms import crop_content
from pixelvote.errors import DataError
from pixelvote.evaluate import metrics as M
from pixelvote.evaluate.extras import append_extras
from pixelvote.evaluate.gallery import GalleryKeeper, thumbnail_case
from pixelvote.evaluate.report import write_report
from pixelvote.evaluate.shortcut import shortcut_check
from pixelvote.evaluate.sources import DecodeSet, EvalItem, fingerprint, list_items, select_split
from pixelvote.explain.analyze import Analysis, MapConfig, analyze, upsample
from pixelvote.models.checkpoint import load_run
from pixelvote.models.ensemble import Ensemble
from pixelvote.refine.crf import CRFConfig

__all__ = ["PRIMARY_SCORE", "SCORES", "evaluate_run"]

log = logging.getLogger(__name__)

#: Per-image uncertainty scores (higher = less certain) ranked in risk-coverage; the first is the headline.
SCORES = ("entropy", "mutual_information", "variance", "one_minus_confidence", "disagreement",
          "member_mask_disagreement", "cam_uncertainty")
PRIMARY_SCORE = "entropy"
_EPS = 1e-12


def _rules(cfg: ConsensusConfig, n: int) -> dict[str, ConsensusConfig]:
    """The fusion rules compared in the fusion table (all with the run's threshold)."""
    rules = {"intersection (AND)": cfg.model_copy(update={"fusion": "intersection"})}
    majority = math.ceil((n + 1) / 2)
    for k in range(1, n):
        name = "union (OR, 1-of-n)" if k == 1 else f"{k}-of-{n} vote"
        name += " (majority)" if k == majority else ""
        rules[name] = cfg.model_copy(update={"fusion": "vote", "policy": "k-of-n", "k": k})
    rules["mean map"] = cfg.model_copy(update={"fusion": "mean"})
    return rules


def _member_alone(a: Analysis, m: int, cfg: ConsensusConfig, bg: int) -> ConsensusResult:
    """Member ``m`` used alone: its own diagnosis gates the mask, its map is binarised like the consensus."""
    st = a.stats[m]
    sub = Analysis([a.member_names[m]], a.probs[m:m + 1], [st], a.probs[m], st["label"], a.target,
                   a.maps[m:m + 1], a.uncertainty[m:m + 1], a.raw_max[m:m + 1], a.inputs, a.given)
    return apply_consensus(sub, cfg, bg)


def _unique(names: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for i, n in enumerate(names):
        out.append(n if not seen[n] else f"{n}#{i}")
        seen[n] += 1
    return out


def _best_box_iou(box: Any, truth_boxes: tuple) -> float:
    """IoU of ``box`` with the best-matching truth box; 0 when there is no box (empty mask)."""
    if box is None or not truth_boxes:
        return 0.0
    return float(M.box_iou([box], list(truth_boxes)).max())


class _State:
    """Everything accumulated over the images: summable pixel state, per-image scalars, the gallery."""

    def __init__(self, ens: Ensemble, cfg: ConsensusConfig, maps: MapConfig, T: int, protocol: str,
                 max_gallery: int, segmenter: tuple[Any, Any] | None = None, labels: bool = False) -> None:
        self.ens, self.cfg, self.maps, self.T, self.protocol = ens, cfg, maps, T, protocol
        self.labels = labels
        self.segmenter = segmenter
        self.seg = {k: M.PixelStats() for k in _segmenter_rows(segmenter)}
        self.bg = ens.background_index
        self.names = _unique([m.name for m in ens.members])
        self.rules = _rules(cfg, len(self.names))
        self.px = {k: M.PixelStats() for k in ("consensus", *self.names, "prior")}
        self.fusion = {k: M.PixelStats() for k in self.rules}
        self.sweep = {k: M.SweepStats() for k in ("consensus", *self.names)}
        self.pointing: dict[str, list[int]] = {k: [0, 0] for k in ("consensus", *self.names, "prior")}
        self.box: dict[str, list[float]] = {k: [0.0, 0] for k in ("consensus", *self.names, "prior")}
        self.rows: list[dict[str, Any]] = []
        self.probs: list[torch.Tensor] = []
        self.member_probs: list[torch.Tensor] = []
        # the diagnoses as analyze made them (by the run's threshold, or its rule with the colour evidence)
        self.diagnoses: list[torch.Tensor] = []
        self.member_diagnoses: list[torch.Tensor] = []
        self.gallery = GalleryKeeper(max_gallery)

    @torch.no_grad()
    def add(self, batch: list[dict[str, Any]]) -> None:
        x = torch.stack([b["input"] for b in batch])
        given = torch.tensor([b["item"].label for b in batch]) if self.labels else None
        a = analyze(self.ens, x, mc_samples=self.T, seeds=[b["item"].seed for b in batch], maps=self.maps,
                    given=given)
        res = apply_consensus(a, self.cfg, self.bg)
        rules = {k: apply_consensus(a, c, self.bg).margin for k, c in self.rules.items()}
        alone = torch.stack([_member_alone(a, m, self.cfg, self.bg).margin for m in range(len(self.names))])
        seg = _segmenter_margins(self.segmenter, x, res.foreground, list(self.seg), self.cfg.crf)
        p = a.ensemble_probs.double().cpu()
        bin_maps = a.maps >= res.thresholds[..., None, None]
        scores = {
            "entropy": -(p * (p + _EPS).log()).sum(-1),
            "mutual_information": torch.stack([s["mutual_information"] for s in a.stats]).mean(0).cpu(),
            "variance": torch.stack([s["variance"] for s in a.stats]).mean(0).cpu(),
            "one_minus_confidence": 1 - p.max(-1).values,
            "disagreement": 1 - res.agreement.cpu(),
            "member_mask_disagreement": 1 - _mean_pairwise_iou(bin_maps).cpu(),
        }
        self.probs.append(p)
        self.member_probs.append(a.probs.double().cpu())
        self.diagnoses.append(a.label.cpu())
        self.member_diagnoses.append(torch.stack([s["label"] for s in a.stats]).cpu())
        for j, b in enumerate(batch):
            s = {k: float(v[j]) for k, v in scores.items()}
            mj = res.margin[j] > 0
            unc = res.uncertainty[j]
            s["cam_uncertainty"] = float(unc[mj].mean() if mj.any() else unc.mean())
            margins = torch.stack([res.margin[j], *(r[j] for r in rules.values()), *alone[:, j],
                                   *(m[j] for m in seg)])
            self._image(b, a, res, j, s, margins)

    def _image(self, b: dict[str, Any], a: Analysis, res: ConsensusResult, j: int, s: dict[str, float],
               margins: torch.Tensor) -> None:
        it: EvalItem = b["item"]
        image: np.ndarray = b["image"]
        h, w = image.shape[:2]
        label = int(a.label[j])
        classes = self.ens.classes
        row: dict[str, Any] = {
            "image": it.rel, "key": it.key, "width": w, "height": h, "truth": classes[it.label],
            "label": classes[label], "probability": float(a.ensemble_probs[j, label]),
            "correct": label == it.label, "flagged": bool(res.reasons[j]), "reasons": list(res.reasons[j]),
            **s, "iou": None, "dice": None}
        truth = b["truth"]
        if truth is not None and truth.any():
            row["iou"], row["dice"] = self._pixels(it, torch.from_numpy(truth), a, res, j, margins, (h, w))
        self.rows.append(row)
        self._offer(b, a, res, j, row)

    def _pixels(self, it: EvalItem, truth: torch.Tensor, a: Analysis, res: ConsensusResult, j: int,
                margins: torch.Tensor, hw: tuple[int, int]) -> tuple[float, float]:
        t = truth.to(margins.device)
        fit = self.ens.resize
        # consensus, each rule, each member alone, the segmenter rows
        masks = upsample(crop_content(margins, hw, fit), hw) > 0
        n_rules, names = len(self.rules), self.names
        cons = masks[0]
        n_alone = 1 + n_rules + len(names)
        member_masks = dict(zip(names, masks[1 + n_rules:n_alone], strict=True))
        for key, m in zip(self.seg, masks[n_alone:], strict=True):
            self.seg[key].update(m, t)
        prior = M.centred_box_prior(hw).to(t.device)
        for key, m in (("consensus", cons), *member_masks.items(), ("prior", prior)):
            self.px[key].update(m, t)
        for key, m in zip(self.rules, masks[1:1 + n_rules], strict=True):
            self.fusion[key].update(m, t)
        soft = upsample(crop_content(torch.cat([res.heat[j:j + 1], a.maps[:, j]]), hw, fit), hw).clamp_(0, 1)
        centre = torch.zeros(hw)
        centre[hw[0] // 2, hw[1] // 2] = 1.0
        for key, m in zip(("consensus", *names), soft, strict=True):
            self.sweep[key].update(m, t)
        for key, sal in (*zip(("consensus", *names), soft, strict=True), ("prior", centre)):
            hit = M.pointing_game(sal.cpu(), t.cpu())
            self.pointing[key][0] += int(bool(hit))
            self.pointing[key][1] += int(hit is not None)
        if self.protocol == "box":
            for key, m in (("consensus", cons), *member_masks.items()):
                self.box[key][0] += _best_box_iou(M.mask_to_box(m), it.boxes)
                self.box[key][1] += 1
            self.box["prior"][0] += _best_box_iou(M.centred_box(hw), it.boxes)
            self.box["prior"][1] += 1
        return float(M.mask_iou(cons, t)), float(M.mask_dice(cons, t))

    def _offer(self, b: dict[str, Any], a: Analysis, res: ConsensusResult, j: int,
               row: dict[str, Any]) -> None:
        iou = row["iou"]
        caption = (f"{row['image']}: truth {row['truth']}, predicted {row['label']} "
                   f"(p={row['probability']:.2f})"
                   + (f", IoU {iou:.3f}" if iou is not None else "")
                   + f"; flags: {', '.join(row['reasons']) or 'none'}")
        truth = None if b["truth"] is None else torch.from_numpy(b["truth"])

        def build() -> dict[str, Any]:
            hw, fit = b["image"].shape[:2], self.ens.resize
            cams = dict(zip(self.names, crop_content(a.maps[:, j], hw, fit), strict=True))
            return thumbnail_case(b["image"], truth, crop_content(res.margin[j], hw, fit), cams,
                                  crop_content(res.uncertainty[j], hw, fit), title=row["image"],
                                  caption=caption)

        if iou is not None:
            self.gallery.offer("best", iou, build)
            self.gallery.offer("worst", -iou, build)
        elif row["correct"]:
            self.gallery.offer("best_cls", row["probability"], build)
        else:
            self.gallery.offer("worst_cls", row["probability"], build)
        if row["flagged"]:
            self.gallery.offer("flagged", row["entropy"], build)

    # ------------------------------------------------------------------ results

    def results(self) -> dict[str, Any]:
        rows, classes = self.rows, self.ens.classes
        y = torch.tensor([classes.index(r["truth"]) for r in rows])
        P = torch.cat(self.probs)
        MP = torch.cat(self.member_probs, dim=1)
        L, ML = torch.cat(self.diagnoses), torch.cat(self.member_diagnoses, dim=1)
        correct = torch.tensor([r["correct"] for r in rows])
        flagged = torch.tensor([r["flagged"] for r in rows])
        iou = torch.tensor([math.nan if r["iou"] is None else r["iou"] for r in rows], dtype=torch.float64)
        rule, evidence = self.ens.decision_threshold, self.ens.evidence_rule
        out: dict[str, Any] = {"classification": {
            "ensemble": M.classification_metrics(y, P, class_names=classes, preds=L),
            "decision_threshold": rule, "accuracy_most_probable": M.accuracy(y, P.argmax(1)),
            "decision_evidence": None if evidence is None else evidence.model_dump(),
            "members": {n: {**M.classification_metrics(y, MP[m], class_names=classes, preds=ML[m]),
                            "ece": M.expected_calibration_error(MP[m], y)}
                        for m, n in enumerate(self.names)}}}
        out["calibration"] = M.reliability_bins(P, y)
        pos = ~torch.isnan(iou)
        risks = {"classification": (~correct).double(), "localisation": 1 - iou[pos]}
        table: dict[str, dict[str, Any]] = {}
        for score in SCORES:
            u = torch.tensor([r[score] for r in rows], dtype=torch.float64)
            table[score] = {}
            for kind, risk in risks.items():
                uu = u if kind == "classification" else u[pos]
                if len(risk):
                    rc = M.risk_coverage(risk, uu)
                    table[score][kind] = {"aurc": rc.aurc, "e_aurc": rc.e_aurc}
                    if score == PRIMARY_SCORE:
                        out.setdefault("risk_coverage", {})[kind] = {**rc.to_dict(), "uncertainty": score}
        out["uncertainty_scores"] = table
        out["flags"] = M.flag_summary(correct, flagged, iou)
        out["flag_reasons"] = dict(Counter(x for r in rows for x in r["reasons"]))
        if pos.any():
            out.update(self._pixel_results())
        return out

    def _pixel_results(self) -> dict[str, Any]:
        names = self.names
        share = lambda v: None if v[1] == 0 else v[0] / v[1]  # noqa: E731
        pixel: dict[str, Any] = {
            "protocol": self.protocol, "images": "positives", "empty_score": 1.0,
            "resolution": "original image size (maps resized bilinearly, as pixelvote annotate does)",
            "consensus": self.px["consensus"].compute(),
            "members": {n: self.px[n].compute() for n in names},
            "prior": self.px["prior"].compute(),
            "pointing_game": {k: share(v) for k, v in self.pointing.items()},
            "pointing_game_tolerance": 15,
            "members_note": "each member alone: its own diagnosis gates the mask; its map is binarised with "
                            "the consensus threshold",
        }
        if self.protocol == "box":
            pixel["box_iou"] = {
                "definition": "IoU of the tight box around the predicted mask with the best-matching truth "
                              "box (0 when the mask is empty), mean over images",
                **{k: share(v) for k, v in self.box.items()}}
        cfg = self.cfg
        th = cfg.threshold_method + (f" {cfg.threshold:g}" if cfg.threshold_method == "fixed" else "")
        rows: list[tuple[str, dict[str, Any]]] = [
            (f"configured: {cfg.fusion} ({cfg.policy}, threshold {th})", self.px["consensus"].compute())]
        rows += [(k, v.compute()) for k, v in self.fusion.items()]
        rows += [(k, v.compute()) for k, v in self.seg.items()]
        if self.seg:
            pixel["segmenter"] = {k: v.compute() for k, v in self.seg.items()}
        rows += [(f"{n} alone", self.px[n].compute()) for n in names]
        rows += [("centred-box prior", self.px["prior"].compute())]
        keys = ("mean_iou", "pooled_iou", "mean_dice", "pooled_dice")
        fusion = {"columns": ["rule", "mean IoU", "pooled IoU", "mean Dice", "pooled Dice"],
                  "rows": [[name, *(c[k] for k in keys)] for name, c in rows]}
        sweep = self.sweep["consensus"].compute()
        sweep["map"] = "mean normalised CAM of the agreeing members (not gated by the diagnosis)"
        sweep["members"] = {n: self.sweep[n].compute() for n in names}
        return {"pixel": pixel, "fusion": fusion, "threshold_sweep": sweep}


def _with_groups(results: dict[str, Any], rows: list[dict[str, Any]], pattern: str | None) -> dict[str, Any]:
    """``results`` with ``pixel.by_group``: the mean IoU and Dice of the consensus masks per group (video,
    patient) of ``pattern``, the run's ``--group-pattern``, over the images with a truth region; images it
    does not match are one group, ``(no group)``. Only where there are two groups or more: one mean over
    several sources hides the source where the masks fail."""
    pixel = results.get("pixel")
    if not pattern or not pixel:
        return results
    from pixelvote.data.dataset import compile_pattern, group_match

    try:
        regex = compile_pattern(pattern)
    except DataError as exc:  # train checks it; a hand-edited run.json must not lose the evaluation
        log.warning("no figures by group: %s", exc)
        return results
    scores: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("iou") is None:
            continue
        group = group_match(Path(str(r["image"])).name, regex) or "(no group)"
        scores.setdefault(group, []).append((float(r["iou"]), float(r["dice"])))
    if len(scores) > 1:
        pixel["by_group"] = {
            "pattern": pattern,
            "groups": {g: {"images": len(v), "mean_iou": float(np.mean([i for i, _ in v])),
                           "mean_dice": float(np.mean([d for _, d in v]))}
                       for g, v in sorted(scores.items())}}
    return results


SEGMENTER_ROW, SEGMENTER_CRF_ROW = "segmenter (stage two)", "segmenter + dense CRF"


def _segmenter_rows(segmenter: tuple[Any, Any] | None) -> list[str]:
    """The fusion-table rows a segmenter adds: its masks, and (with pydensecrf2) those refined by the CRF."""
    if segmenter is None:
        return []
    from pixelvote.refine import crf

    return [SEGMENTER_ROW, *([SEGMENTER_CRF_ROW] if crf.available() else [])]


def _segmenter_margins(segmenter: tuple[Any, Any] | None, x: torch.Tensor, foreground: torch.Tensor,
                       rows: list[str], crf_cfg: CRFConfig | None = None) -> list[torch.Tensor]:
    """Margins ``(B, S, S)`` (> 0 = mask) per segmenter row, gated like annotate's by the ensemble's
    diagnosis: an image diagnosed as background gets no mask. The CRF row uses ``crf_cfg`` (the run's
    consensus.crf, as annotate does)."""
    if segmenter is None:
        return []
    from pixelvote.segment.train import predict, refined_margin

    model, scfg = segmenter
    prob = predict(model, x)
    if prob.shape[-2:] != x.shape[-2:]:
        prob = upsample(prob, (int(x.shape[-2]), int(x.shape[-1])))
    out = [prob - scfg.threshold]
    if SEGMENTER_CRF_ROW in rows:
        out.append(refined_margin(prob, x, scfg, crf_cfg))
    gate = foreground.to(prob.device).view(-1, 1, 1)
    return [torch.where(gate, m, torch.full_like(m, -1.0)) for m in out]


def _mean_pairwise_iou(masks: torch.Tensor) -> torch.Tensor:
    """Mean IoU over pairs of members' masks ``(M, B, S, S)`` -> ``(B,)`` (1 for a single member)."""
    n = masks.shape[0]
    if n < 2:
        return torch.ones(masks.shape[1], device=masks.device)
    vals = []
    for i in range(n):
        for k in range(i + 1, n):
            inter = (masks[i] & masks[k]).flatten(1).sum(1).float()
            union = (masks[i] | masks[k]).flatten(1).sum(1).float()
            vals.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)))
    return torch.stack(vals).mean(0)


def _shortcut(items: list[EvalItem]) -> dict[str, Any]:
    ws, hs, exts, labels = [], [], [], []
    for it in items:
        try:
            w, h = image_size(it.path)
        except DataError:
            continue
        ws.append(w)
        hs.append(h)
        exts.append(it.path.suffix.lower())
        labels.append(it.label)
    return {**shortcut_check(ws, hs, exts, labels), "images": "every labelled image of the data"}


def evaluate_run(run: str | Path, data: str | Path, out: str | Path, *, split: str | None = None,
                 mc_samples: int | None = None, batch_size: int = 8, device: str | None = None,
                 tbx11k_mapping: TBMapping | None = None, max_gallery: int = 12,
                 consensus: dict[str, Any] | None = None, maps: dict[str, Any] | None = None,
                 method: str = "run", class_map: dict[str, str] | None = None, dataset: str | None = None,
                 num_workers: int | None = None, segmenter: str | Path | None = None,
                 labels: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate the run at ``run`` on the labelled images in ``data``; write ``out/metrics.json`` and
    ``out/report.html``; return the metrics as written (JSON-ready; NaN as None).

    ``data``: class folders (``images/<class>/``, optional ``masks/<class>/<stem>.png``), a CSV manifest
    ``path,label[,mask]``, or a TBX11K root (boxes; ``tbx11k_mapping`` says which folders are TB).
    ``split``: ``"val"`` / ``"test"`` (the run's split.json lists), ``"all"``, or None: ``"val"`` when
    ``data`` is the run's training data, else ``"all"``. ``method``: ``"run"`` (the run's calibrated
    recipe) or ``"paper"`` (plain XGrad-CAM, unanimous intersection at 0.5), as for `pixelvote annotate`;
    ``consensus`` / ``maps`` override fields of it. ``class_map`` renames data classes to run classes;
    ``dataset`` names the data in the report (``"tbx11k"``, ``"fire"``, ``"busi"`` pick the paper's row).
    ``segmenter``: a `pixelvote segment train` folder whose masks (gated by the ensemble's diagnosis, as
    ``annotate --segmenter`` writes them) are scored beside the CAM rules, also refined by the dense CRF
    where pydensecrf2 is installed. ``labels``: score the masks as ``annotate --labels`` makes them (each
    image explained for its true class, whatever the diagnosis), the figure for annotating labelled images."""
    from pixelvote.engine.annotate import method_recipe

    t0 = time.time()
    run, data, out = Path(run), Path(data), check_out_dir(out)
    ens, run_cfg = load_run(run, device=device, fold=True)
    base_c, base_m = method_recipe(run_cfg, method, labels)
    cfg = ConsensusConfig.model_validate({**base_c.model_dump(), **(consensus or {})})
    mcfg = MapConfig.model_validate({**base_m.model_dump(), **(maps or {})})
    T = int(mc_samples or run_cfg.mc_samples)
    es = list_items(data, ens.classes, ens.background, mapping=tbx11k_mapping, class_map=class_map)
    chosen, used_split, notes = select_split(es.items, split, run, run_cfg.data.get("root"), data)
    seg = None
    if segmenter is not None:
        from pixelvote.segment.train import load_segmenter

        seg = load_segmenter(segmenter, device=ens.device)
    state = _State(ens, cfg, mcfg, T, es.protocol, max_gallery, seg, labels)
    skipped, mask_problems = list(es.skipped), []
    workers = num_workers if num_workers is not None else min(2, max(0, (torch.get_num_threads() or 1) - 1))
    loader = torch.utils.data.DataLoader(DecodeSet(chosen, ens.image_size, ens.resize), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list,
                                         prefetch_factor=2 if workers else None)
    with tqdm(total=len(chosen), desc="evaluating", unit="img", disable=not progress) as bar:
        for batch in loader:
            for b in batch:
                if "error" in b:
                    skipped.append({"image": str(b["item"].path), "reason": b["error"]})
                elif b["problem"]:
                    reason = b["problem"] + " (image evaluated for classification only)"
                    mask_problems.append({"image": str(b["item"].path), "mask": str(b["item"].mask),
                                          "reason": reason})
            good = [b for b in batch if "error" not in b]
            if good:
                state.add(good)
            bar.update(len(batch))
    if not state.rows:
        raise DataError(f"none of the {len(chosen)} selected images could be read", path=data,
                        fix="see the skipped list in the log; re-export the images")
    metrics = _assemble(state, run, run_cfg, cfg, es, chosen, used_split, notes, data,
                        {"T": T, "batch_size": batch_size, "device": str(ens.device), "dataset": dataset,
                         "method": method})
    metrics["skipped"], metrics["mask_problems"] = skipped, mask_problems
    if skipped:
        metrics["notes"].append(f"{len(skipped)} input(s) could not be read and were skipped (listed below).")
    if mask_problems:
        metrics["warnings"].append(f"{len(mask_problems)} mask(s) do not fit their image; those images were "
                                   "evaluated for classification only (listed below).")
    metrics["timing"] = {"seconds": round(time.time() - t0, 3), "images": len(state.rows)}
    path = write_report(metrics, state.gallery.items(), out)
    written = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    append_extras(path, written)
    return written


def _assemble(state: _State, run: Path, run_cfg: Any, cfg: ConsensusConfig, es: Any, chosen: list[EvalItem],
              split: str, notes: list[str], data: Path, opts: dict[str, Any]) -> dict[str, Any]:
    classes = state.ens.classes
    name = opts["dataset"] or es.dataset
    counts = Counter(r["truth"] for r in state.rows)
    notes = list(es.notes) + notes
    warnings: list[str] = []
    if len(counts) < 2:
        notes.append(f"Only one class ({next(iter(counts))!r}) among the evaluated images: classification on "
                     "a one-class set is not meaningful (accuracy is that class's recall; AUROC is "
                     "undefined).")
    if es.protocol == "box":
        notes.append("Box protocol: truth = the filled union of each image's TB boxes, rescaled from the "
                     "scan size in the XML to the image file; the paper's most plausible protocol (it states "
                     "none).")
    if split == "val" and cfg.threshold_source.startswith("validation"):
        notes.append("The consensus threshold was tuned on the run's validation images, which are also the "
                     "images scored here: the IoU is optimistic.")
    if es.protocol != "none" and not any(r["iou"] is not None for r in state.rows):
        notes.append("No evaluated image has a non-empty truth region: no localisation figures.")
    if state.labels:
        notes.append("Masks as `annotate --labels` makes them: each image's true class decides whether it "
                     "gets a mask, whatever the ensemble diagnosed, so a missed lesion still gets one. This "
                     "is the figure for annotating labelled images, not for diagnosing new ones.")
    shortcut = _shortcut(es.items)
    if shortcut.get("warning"):
        warnings.append(shortcut["message"])
    return {
        "dataset": name, "title": f"pixelvote evaluation — {name} ({split})", "classes": classes,
        "n_images": len(state.rows), "run": str(run.resolve()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"split": split, "mc_samples": opts["T"], "batch_size": opts["batch_size"],
                   "device": opts["device"], "image_size": state.ens.image_size, "members": state.names,
                   "background": state.ens.background, "method": opts["method"],
                   "masks_from": "labels" if state.labels else "diagnosis",
                   "consensus": cfg.model_dump(mode="json"), "maps": state.maps.model_dump(mode="json"),
                   "uncertainty_score": PRIMARY_SCORE},
        "data": {"path": str(data.resolve()), "protocol": es.protocol, "images_listed": len(es.items),
                 "images_selected": len(chosen), "class_counts": {c: counts.get(c, 0) for c in classes},
                 "fingerprint": fingerprint(es.root, chosen)},
        **_with_groups(state.results(), state.rows, run_cfg.train.get("group_pattern")),
        "shortcut_check": shortcut, "warnings": warnings, "notes": notes,
        "per_image": state.rows,
    }
