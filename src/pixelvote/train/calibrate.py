"""Let the validation split set the consensus threshold and the flag thresholds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from pixelvote.consensus import ConsensusConfig, apply_consensus
from pixelvote.data.imageio import write_json_atomic
from pixelvote.explain.analyze import MapConfig, analyze, diagnose, finding_or_background
from pixelvote.explain.evidence import EvidenceRule, colour_evidence
from pixelvote.models.checkpoint import Recipe, load_run
from pixelvote.models.ensemble import Ensemble
from pixelvote.refine.colour import BINS, ColourPrior, learn_colour_prior
from pixelvote.refine.tone import Tone, learn_tone, tone_evidence
from pixelvote.train.cache import CachedSet
from pixelvote.train.config import TrainConfig

log = logging.getLogger(__name__)

THRESHOLD_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10 .. 0.90
# validation images of the background and of the findings needed to choose a diagnosis rule
MIN_PER_CLASS = 5
# decision thresholds on P(not background): finer near 0, where a classifier that has not seen a camera's
# images puts its findings there
DECISION_GRID = (0.02, 0.05, *(round(0.05 * i, 2) for i in range(2, 20)))  # 0.02, 0.05, 0.10 .. 0.95


def batch_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of boolean masks ``(B, H, W)``; two empty masks count as 1."""
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _seeds(start: int, n: int, bs: int) -> list[int]:
    """The MC seeds of the batch of validation images from ``start``: their indices (the seeds of
    :func:`_val_batches` and of calibration's other analyses)."""
    return list(range(start, min(n, start + bs)))


def _val_batches(val: CachedSet, bs: int):  # type: ignore[no-untyped-def]
    from pixelvote.evaluate.selection import Batch

    for i in range(0, len(val), bs):
        masks = [val.truth(j) for j in range(i, min(i + bs, len(val)))]
        yield Batch(val.images[i:i + bs], val.labels[i:i + bs], masks, _seeds(i, len(val), bs))


def training_priors(ens: Ensemble, train: CachedSet, batch_size: int, bins: int = BINS, colour: bool = True,
                    tone: bool = True) -> tuple[ColourPrior | None, Tone | None, float]:
    """What the run learns from its training images' labels, in one pass over them (each image's map is
    the mean of every member's plain map of its labelled class): the colour prior
    (:mod:`pixelvote.refine.colour`, ``bins`` per channel; None unless ``colour``) and the findings' tone
    with its evidence (:mod:`pixelvote.refine.tone`; None, 0.0 unless ``tone``)."""
    bg = ens.background_index
    evidence: list[tuple[float, int]] = []

    def batches():  # type: ignore[no-untyped-def]
        for i in tqdm(range(0, len(train), batch_size), desc="learning from the training images' labels",
                      unit="batch", leave=False):
            imgs, labels = train.images[i:i + batch_size], train.labels[i:i + batch_size]
            a = analyze(ens, imgs, mc_samples=1, seeds=list(range(i, i + len(labels))), given=labels)
            maps = a.maps.mean(0)
            if tone:
                evidence.append(tone_evidence(imgs, labels, maps, bg))
            yield imgs, labels, maps

    if colour:
        prior = learn_colour_prior(batches(), bg, bins)
    else:
        prior = None
        for _ in batches():
            pass
    found, mean = learn_tone(evidence) if tone else (None, 0.0)
    return prior, found, mean


def colour_prior(ens: Ensemble, train: CachedSet, batch_size: int, bins: int = BINS) -> ColourPrior | None:
    """The run's colour prior alone (see :func:`training_priors`)."""
    return training_priors(ens, train, batch_size, bins, tone=False)[0]


def choose_recipe(run_dir: Path, val: CachedSet, cfg: TrainConfig, decision_threshold: float | None = None,
                  prior: ColourPrior | None = None, evidence: EvidenceRule | None = None,
                  tone: Tone | None = None,
                  ) -> tuple[MapConfig, dict, dict, dict[str, tuple[MapConfig, dict]]]:
    """Pick the map recipe, fusion (+ refinement) and threshold with the best mean IoU on validation masks,
    among those whose cost is within ``cfg.max_map_cost`` plain analyses (for annotation), and the best within
    ``cfg.max_pseudo_label_cost`` (``annotate --method best``), and the best within ``cfg.max_map_cost``
    with the images' labels deciding (``annotate --labels``). With a colour ``prior`` the mean fusions are
    tried with it too (at each of ``cfg.colour_weights``), and with a ``tone`` every mean fusion is tried
    with the tone map too (at each of ``cfg.tone_weights``). Returns the first as its MapConfig and its
    consensus update, the summary, and the other two (``"best"``, ``"labelled"``) likewise."""
    from pixelvote.evaluate.selection import (
        GRID,
        RECIPES,
        best_cell,
        collect_modes,
        colour_fusions,
        consensus_update,
        cost_basis,
        crf_fusions,
        crf_iterations,
        relative_cost,
        tone_fusions,
        variant_cost,
    )
    from pixelvote.refine import crf

    ens, run_cfg = load_run(run_dir, device=cfg.device)
    run_cfg.consensus = run_cfg.consensus.model_copy(update={"colour_prior": prior, "tone": tone})
    # the masks are gated by the diagnosis the run will make
    ens.decision_threshold, ens.evidence_rule, ens.colour_prior = decision_threshold, evidence, prior
    limit = max(cfg.max_map_cost, cfg.max_pseudo_label_cost)
    # costs in plain analyses of these members: the CRF is cheaper beside a slower forward pass
    basis = cost_basis([m.name for m in run_cfg.members], run_cfg.image_size)
    base_crf = run_cfg.consensus.crf

    def recipe_cost(key: str) -> float:
        return relative_cost(RECIPES[key], basis=basis)

    def cost(maps_cfg: MapConfig, fusion: str) -> float:
        return variant_cost(maps_cfg, fusion, base_crf, basis)

    # a recipe that costs more than both limits on its own could never be chosen: it is not tried (the
    # cheapest one always is, so that there is a choice)
    cheapest = min(cfg.map_candidates, key=recipe_cost)
    recipes = {k: RECIPES[k] for k in cfg.map_candidates if recipe_cost(k) <= limit or k == cheapest}
    skipped = {k: recipe_cost(k) for k in cfg.map_candidates if k not in recipes}
    fusions = ["intersection", "mean", "vote"]
    refined: list[str] = []
    if "crf" in cfg.refine_candidates:
        if crf.available():
            refined = crf_fusions(cfg.crf_weights, cfg.crf_iterations, cfg.crf_cutoffs, cfg.crf_sizes,
                                  own_size=run_cfg.consensus.crf.size, map_size=run_cfg.image_size)
        else:
            log.info("pydensecrf2 is not installed, so the CRF refinement is not tried (%s)",
                     crf.INSTALL_HINT)
    if prior is not None and cfg.colour_weights:
        coloured = colour_fusions(cfg.colour_weights, refined)
        fusions += [f for f in coloured if "+" not in f]
        refined += [f for f in coloured if "+" in f]
    if tone is not None and cfg.tone_weights:
        fusions += tone_fusions(cfg.tone_weights, fusions)
        refined += tone_fusions(cfg.tone_weights, refined)
    bs = max(1, cfg.batch_size)

    # masks as the diagnosis gates them (annotation) and as `annotate --labels` makes them (`best` and
    # `labelled`, within the pseudo-label limit), scored in one pass over the validation images per recipe
    for_labels = [k for k in recipes if recipe_cost(k) <= cfg.max_pseudo_label_cost or k == cheapest]
    tables: dict = {}
    labelled: dict = {}

    def with_agreeing(fs: list[str]) -> list[str]:
        """Which members fuse for labelled images: every one, or the agreeing ones."""
        return fs + [f"{f}@agreeing" for f in fs if f.startswith("mean")]

    def score(name: str, modes: dict[bool, list[str]], what: str) -> None:
        n_fusions = sum(len(f) for f in modes.values())
        batches = tqdm(_val_batches(val, bs), total=-(-len(val) // bs), unit="batch", leave=False,
                       desc=f"choosing the map recipe ({name} x {n_fusions} {what})")
        # one CRF pass per image and threshold serves every iteration count tried with these maps
        steps = {crf_iterations(f) or base_crf.iterations for fs in modes.values() for f in fs if "+" in f}
        with crf.reuse(steps=steps):
            # scored with the consensus the choice is saved into (its CRF settings, but the weight and
            # the iterations)
            scored = collect_modes(ens, batches, {name: recipes[name]}, modes, base=run_cfg.consensus)
        tables.update(scored.get(False, {}))
        labelled.update(scored.get(True, {}))

    for name in recipes:
        modes = {False: list(fusions)}
        if name in for_labels:
            modes[True] = with_agreeing(list(fusions))
        score(name, modes, "fusions")

    def top(table: dict, names: list[str], limit: float) -> list[str]:
        """The ``cfg.crf_recipes`` recipes among ``names`` that the CRF fits within ``limit`` with the best
        mean IoU without it."""
        def without(r: str) -> float:
            return max((float(t.ious.mean(0).nan_to_num(-1.0).max()) for (k, _), t in table.items()
                        if k == r and len(t.ious)), default=-1.0)
        fits = [r for r in names if any(cost(recipes[r], f) <= limit for f in refined)]
        return sorted(fits, key=without, reverse=True)[:cfg.crf_recipes]

    def base(fusion: str) -> str:
        """The fusion with its priors but without its refinement or members: ``mean*tone:0.5``."""
        return fusion.partition("@")[0].partition("+")[0]

    def top_bases(table: dict, recipe: str) -> list[str]:
        """The ``cfg.crf_bases`` fusions the CRF refines whose masks score best without it on ``recipe``."""
        scores: dict[str, float] = {}
        for (r, f), t in table.items():
            if r == recipe and "+" not in f and len(t.ious):
                b = base(f)
                scores[b] = max(scores.get(b, -1.0), float(t.ious.mean(0).nan_to_num(-1.0).max()))
        refinable = {base(f) for f in refined}
        return sorted((b for b in scores if b in refinable), key=scores.__getitem__,
                      reverse=True)[:cfg.crf_bases]

    # the CRF's grid is most of the time: it is scored on the recipes that do best without it, per choice,
    # and there on the fusions (priors) that do best without it
    crf_gated = top(tables, list(recipes), cfg.max_map_cost)
    crf_labelled = {*top(labelled, for_labels, cfg.max_pseudo_label_cost),
                    *top(labelled, for_labels, cfg.max_map_cost)}
    crf_bases: dict[str, dict[str, list[str]]] = {"gated": {}, "labelled": {}}
    for name in recipes:
        modes = {}
        if name in crf_gated:
            crf_bases["gated"][name] = kept = top_bases(tables, name)
            modes[False] = [f for f in refined
                            if base(f) in kept and cost(recipes[name], f) <= cfg.max_map_cost]
        if name in crf_labelled:
            crf_bases["labelled"][name] = kept = top_bases(labelled, name)
            modes[True] = with_agreeing([f for f in refined if base(f) in kept
                                         and cost(recipes[name], f) <= cfg.max_pseudo_label_cost])
        modes = {m: fs for m, fs in modes.items() if fs}
        if modes:
            score(name, modes, "CRF settings")
    costs = {(r, f): cost(RECIPES[r], f) for (r, f) in {**tables, **labelled}}
    allowed = ([key for key in tables if costs[key] <= cfg.max_map_cost]
               or [min(tables, key=costs.__getitem__)])
    # `best` makes pseudo-masks of labelled images (annotate --labels): scored as such, so that a recipe is
    # not judged by the images the ensemble misdiagnoses
    pseudo = [key for key in labelled if costs[key] <= cfg.max_pseudo_label_cost] or list(labelled)
    n = len(next(iter(tables.values())).ious)

    def pick(keys: list[tuple[str, str]], limit: float,
             tables: dict = tables) -> tuple[MapConfig, dict, dict]:
        """The best cell among ``keys``: its maps, its consensus update and its summary."""
        (recipe, fusion), j, score = best_cell(tables, keys=keys)
        update = {**consensus_update(run_cfg.consensus, fusion), "threshold": GRID[j],
                  "threshold_method": "fixed",
                  "threshold_source": f"validation: {recipe} + {fusion}, best mean IoU {score:.3f} on {n} "
                                      f"images (cost <= {limit:g} plain analyses)"}
        return recipes[recipe], update, {"recipe": recipe, "fusion": fusion, "threshold": GRID[j],
                                         "val_mean_iou": score, "relative_cost": costs[(recipe, fusion)]}

    maps, update, chosen = pick(allowed, cfg.max_map_cost)
    best_maps, best_update, best = pick(pseudo, cfg.max_pseudo_label_cost, labelled)
    best["scored_with"] = "the images' labels (annotate --labels)"
    lab_keys = [k for k in labelled if costs[k] <= cfg.max_map_cost] or pseudo
    lab_maps, lab_update, lab = pick(lab_keys, cfg.max_map_cost, labelled)
    candidates = {f"{r}+{f}": {"mean_iou_by_threshold": {str(t): round(float(v), 4) for t, v in
                                                         zip(GRID, tab.ious.mean(0), strict=True)
                                                         if not v.isnan()} if len(tab.ious) else {},
                               "seconds_per_image": round(tab.seconds_per_image, 4),
                               "relative_cost": round(costs[(r, f)], 3), "allowed": (r, f) in allowed}
                  for (r, f), tab in tables.items()}
    summary = {**chosen, "images_with_masks": n, "best": best, "labelled": lab, "candidates": candidates,
               "labelled_candidates": {f"{r}+{f}": round(float(tab.ious.mean(0).nan_to_num(-1.0).max()), 4)
                                       if len(tab.ious) else None for (r, f), tab in labelled.items()},
               "not_tried_over_cost": skipped,
               "crf_tried_on": {"gated": crf_gated, "labelled": [r for r in recipes if r in crf_labelled]},
               "crf_tried_with": crf_bases,
               "cost_basis": {"forward_ms": round(basis.forward_ms, 2), "image_size": basis.image_size,
                              "members": basis.members,
                              "source": basis.source}}
    return maps, update, summary, {"best": (best_maps, best_update), "labelled": (lab_maps, lab_update)}


def choose_decision_threshold(probs: torch.Tensor, labels: torch.Tensor, background: int,
                              min_per_class: int = MIN_PER_CLASS) -> tuple[float | None, dict]:
    """The diagnosis rule with the best accuracy on the validation images: the most probable class (None), or
    a finding wherever ``1 - P(background)`` exceeds a threshold of :data:`DECISION_GRID` (see
    :func:`pixelvote.explain.analyze.diagnose`). Ties keep the most probable class, then the threshold
    nearest 0.5; with fewer than ``min_per_class`` validation images of the background or of the findings,
    nothing is chosen. Returns the threshold and a summary (accuracy by rule)."""
    fg = labels != background
    counts = (int((~fg).sum()), int(fg.sum()))
    if min(counts) < min_per_class:
        why = (f"too few validation images to choose ({counts[0]} background, {counts[1]} findings; "
               f"{min_per_class} each needed)")
        return None, {"threshold": None, "reason": why}
    rules: list[float | None] = [None, *DECISION_GRID]
    acc = {t: float((diagnose(probs, background, t) == labels).float().mean()) for t in rules}
    best = max(acc.values())
    ties = [t for t in rules if acc[t] >= best - 1e-9]
    chosen = None if None in ties else min(ties, key=lambda t: (abs(t - 0.5), t))
    return chosen, {"threshold": chosen, "val_accuracy": acc[chosen], "val_accuracy_most_probable": acc[None],
                    "accuracy_by_threshold": {str(t): round(v, 4) for t, v in acc.items() if t is not None}}


class Calibration(NamedTuple):
    consensus: ConsensusConfig
    maps: MapConfig
    recipes: dict[str, Recipe]  # "best" and "labelled", where chosen
    decision_threshold: float | None
    decision_evidence: EvidenceRule | None


def choose_decision_rule(probs: torch.Tensor, evidence: dict[float, torch.Tensor], labels: torch.Tensor,
                         background: int, min_per_class: int = MIN_PER_CLASS, repeats: int = 10,
                         ) -> tuple[EvidenceRule | None, dict]:
    """Whether weighing the colour evidence (``evidence``: per colour weight, ``(N,)`` per image, see
    :mod:`pixelvote.explain.evidence`) diagnoses the validation images better than the threshold of
    :func:`choose_decision_threshold`. Both rules are chosen on one half of the images and scored on the
    other (stratified halves, ``repeats`` random halvings, seeded): a logistic regression on
    ``(logit P(not background), evidence)`` against the threshold chosen on the same half. The rule with
    the evidence is kept (fitted on all the images, at its best weight) only where its held-out accuracy
    is higher. Returns it or None, and a summary of the held-out accuracies."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    fg = labels != background
    counts = (int((~fg).sum()), int(fg.sum()))
    if min(counts) < min_per_class or not evidence:
        why = (f"too few validation images to choose ({counts[0]} background, {counts[1]} findings; "
               f"{min_per_class} each needed)" if evidence else "no colour prior")
        return None, {"kept": False, "reason": why}
    y = fg.numpy().astype(int)
    truth = labels.numpy()
    logit = torch.logit((1.0 - probs[:, background]).double().clamp(1e-6, 1 - 1e-6)).numpy()

    def fit(X: np.ndarray, yy: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=10.0).fit(X, yy)

    def classes(found: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return finding_or_background(probs[idx], torch.from_numpy(found), background).numpy()

    held: dict[str, list[float]] = {"threshold": [], **{f"evidence:{w:g}": [] for w in evidence}}
    for r in range(repeats):
        preds = {k: np.zeros_like(truth) for k in held}
        for tr, te in StratifiedKFold(2, shuffle=True, random_state=r).split(logit, y):
            t, _ = choose_decision_threshold(probs[tr], labels[tr], background, min_per_class=1)
            preds["threshold"][te] = diagnose(probs[te], background, t).numpy()
            for w, ev in evidence.items():
                X = np.stack([logit, ev.double().numpy()], 1)
                preds[f"evidence:{w:g}"][te] = classes(fit(X[tr], y[tr]).predict(X[te]).astype(bool), te)
        for k, pr in preds.items():
            held[k].append(float((pr == truth).mean()))
    mean = {k: float(np.mean(v)) for k, v in held.items()}
    best = max((k for k in mean if k != "threshold"), key=lambda k: mean[k])
    summary = {"held_out_accuracy": {k: round(v, 4) for k, v in mean.items()},
               "held_out": f"mean of {repeats} random halvings, each rule chosen on one half and scored "
                           "on the other"}
    if mean[best] <= mean["threshold"]:
        return None, {**summary, "kept": False, "reason": "the evidence does not beat the threshold held out"}
    w = float(best.split(":")[1])
    X = np.stack([logit, evidence[w].double().numpy()], 1)
    model = fit(X, y)
    rule = EvidenceRule(colour_weight=w, logit_coef=float(model.coef_[0, 0]),
                        evidence_coef=float(model.coef_[0, 1]), intercept=float(model.intercept_[0]))
    found = rule.finding(1.0 - probs[:, background], evidence[w])
    accuracy = float((finding_or_background(probs, found, background) == labels).float().mean())
    summary.update(kept=True, rule=rule.model_dump(), val_accuracy=accuracy)
    return rule, summary


def calibrate(run_dir: Path, val: CachedSet, cfg: TrainConfig, train: CachedSet | None = None,
              masks: CachedSet | None = None) -> Calibration:
    """The run's consensus and map settings from the validation split, the other recipes chosen there
    (``best``: within the pseudo-label cost limit; ``labelled``: for ``annotate --labels``; none when the
    validation masks are too few to choose), and the decision threshold (:func:`choose_decision_threshold`;
    None with ``cfg.decision == "most-probable"``). With the ``train`` images (and ``cfg.colour_weights``)
    the colour prior is learned from them and tried as a recipe, where there are validation masks enough
    to choose one, and (``cfg.colour_evidence``) as evidence in the diagnosis (:func:`choose_decision_rule`;
    the rule, or None); it is kept in the consensus where either uses it. So is the findings' tone (with
    ``cfg.tone_weights``), as a recipe only. The masks are chosen on the
    images of ``masks`` (default: ``val``'s own; see :func:`pixelvote.train.loop.calibration_samples`)."""
    ens, run_cfg = load_run(run_dir, device=cfg.device)
    bg = ens.background_index
    base = run_cfg.consensus
    bs = max(1, cfg.batch_size)
    base = base.model_copy(update={"colour_prior": None, "colour_weight": 0.0, "tone": None,
                                   "tone_weight": 0.0})
    ens.evidence_rule = ens.colour_prior = None
    scored = val if masks is None else masks
    masked = scored.has_mask & (scored.labels != bg)
    n_masked = int(masked.sum())
    choosing = n_masked >= cfg.min_masks_to_choose and bool(cfg.map_candidates)
    counts = [int((val.labels == bg).sum()), int((val.labels != bg).sum())]
    weigh = cfg.decision == "validation" and cfg.colour_evidence and min(counts) >= MIN_PER_CLASS
    # learned only where it will be tried (as a recipe, or as evidence for the diagnosis)
    want_colour = bool(cfg.colour_weights) and (choosing or weigh)
    want_tone = bool(cfg.tone_weights) and choosing
    prior, tone, tone_mean = (training_priors(ens, train, bs, colour=want_colour, tone=want_tone)
                              if train is not None and len(train) and (want_colour or want_tone)
                              else (None, None, 0.0))
    probs, mis, variances = [], [], []
    evidence: dict[float, list[torch.Tensor]] = {}
    if prior is not None and weigh:
        evidence = {w: [] for w in cfg.colour_weights}
    for i in tqdm(range(0, len(val), bs), desc="calibrating on validation images", unit="batch", leave=False):
        # seeded per image, as annotate seeds them: the choices do not depend on the global RNG's state
        a = analyze(ens, val.images[i:i + bs], mc_samples=cfg.mc_samples, seeds=_seeds(i, len(val), bs))
        probs.append(a.ensemble_probs.cpu())
        mis.append(torch.stack([s["mutual_information"] for s in a.stats]).mean(0).cpu())
        variances.append(torch.stack([s["variance"] for s in a.stats]).mean(0).cpu())
        for w, ev in evidence.items():  # the plain maps, as analyze weighs them
            ev.append(colour_evidence(a.maps.mean(0), a.inputs, prior, w).cpu())
    P = torch.cat(probs) if probs else torch.zeros(0, len(ens.classes))
    decision: float | None = None
    rule: EvidenceRule | None = None
    decision_summary: dict = {"threshold": None, "reason": "train --decision most-probable"}
    if cfg.decision == "validation":
        decision, decision_summary = choose_decision_threshold(P, val.labels, bg)
        if evidence:
            rule, decision_summary["evidence"] = choose_decision_rule(
                P, {w: torch.cat(v) for w, v in evidence.items()}, val.labels, bg)
    ens.decision_threshold, ens.evidence_rule, ens.colour_prior = decision, rule, prior
    update: dict = {}
    accuracy = float((diagnose(P, bg, decision) == val.labels).float().mean()) if len(val) else 0.0
    if rule is not None:
        accuracy = decision_summary["evidence"]["val_accuracy"]
    val_paths = {v.path for v in val.samples}
    from_val = sum(s.path in val_paths for s, m in zip(scored.samples, masked.tolist(), strict=True) if m)
    summary: dict = {"val_images": len(val), "val_accuracy": accuracy, "decision": decision_summary,
                     "images_with_masks": n_masked,
                     "masks_from": {"validation": from_val, "kept_out_of_training": n_masked - from_val}}
    maps = run_cfg.maps
    others: dict[str, tuple[MapConfig, dict]] = {}
    if choosing or rule is not None:  # where nothing uses it, it is not kept
        update["colour_prior"] = prior
    if choosing:
        if want_tone:
            summary["tone"] = {"tone": tone, "mean_local_contrast_under_maps": round(tone_mean, 5),
                               "weights_tried": list(cfg.tone_weights) if tone is not None else []}
        maps, chosen, summary["selection"], others = choose_recipe(run_dir, scored, cfg, decision, prior,
                                                                   rule, tone)
        update["tone"] = tone
        update.update(chosen)
        summary["val_mean_iou"] = summary["selection"]["val_mean_iou"]
    elif n_masked:  # too few masks to choose a recipe: the consensus threshold alone
        from pixelvote.evaluate.selection import at_size

        sums = torch.zeros(len(THRESHOLD_GRID))
        for i in range(0, len(scored), bs):
            use = masked[i:i + bs]
            if not use.any():
                continue
            a = analyze(ens, scored.images[i:i + bs], mc_samples=cfg.mc_samples,
                        seeds=_seeds(i, len(scored), bs))
            rows = use.nonzero().flatten().tolist()
            for j, t in enumerate(THRESHOLD_GRID):
                fixed = base.model_copy(update={"threshold": t, "threshold_method": "fixed"})
                margin = apply_consensus(a, fixed, bg).margin.cpu()
                for r in rows:
                    truth = scored.truth(i + r)
                    assert truth is not None
                    pred = at_size(margin[r], truth, ens.resize) > 0
                    sums[j] += float(batch_iou(pred[None], truth[None])[0])
        means = sums / n_masked
        best = int(means.argmax())
        update.update(threshold=THRESHOLD_GRID[best], threshold_method="fixed",
                      threshold_source=f"validation: best mean IoU {float(means[best]):.3f} "
                                       f"on {n_masked} images")
        summary["threshold_sweep"] = {str(t): round(float(m), 4)
                                      for t, m in zip(THRESHOLD_GRID, means, strict=True)}
        summary["val_mean_iou"] = float(means[best])
    if mis:
        q = cfg.flag_quantile
        update["mi_threshold"] = float(torch.quantile(torch.cat(mis), q))
        update["variance_threshold"] = float(torch.quantile(torch.cat(variances), q))
    consensus = base.model_copy(update=update)
    recipes = {k: Recipe(consensus=consensus.model_copy(update=u), maps=m) for k, (m, u) in others.items()}
    summary["consensus"] = consensus.model_dump(mode="json")
    summary["maps"] = maps.model_dump(mode="json")
    write_json_atomic(run_dir / "calibration.json", summary)
    log.info("calibration: %s", {k: v for k, v in summary.items()
                                 if k not in ("threshold_sweep", "selection", "decision")})
    return Calibration(consensus, maps, recipes, decision, rule)
