"""Let the validation masks decide: IoU of every (map recipe, fusion, threshold) on the same images.

For each image the fused score map is made once per fusion (consensus at threshold 0 gives the min /
mean / k-th largest of the agreeing members' maps), resized to the image's original size, and compared
with the truth at every threshold of the grid. The result is an IoU table per variant, ``(N, len(grid))``,
from which a choice can be made - and honestly scored by cross-fitting (choose on one half, score on the
other).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pixelvote.consensus import ConsensusConfig, SoftMargins, apply_consensus, soft_margins
from pixelvote.data.transforms import crop_content
from pixelvote.explain.analyze import Analysis, MapConfig, analyze, explained_class
from pixelvote.models.ensemble import Ensemble
from pixelvote.refine import crf
from pixelvote.refine.crf import CRFConfig

GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
# a refined fusion (the dense CRF) runs once per threshold, so it is scored up to here only: above it, its
# IoU is NaN (not tried). Its best threshold lay between 0.05 and 0.55 for every recipe on fire and BUSI
REFINED_MAX_THRESHOLD = 0.6


def refined_at(threshold: float) -> bool:
    """Whether a refined fusion (the dense CRF) is run at ``threshold`` (see REFINED_MAX_THRESHOLD)."""
    return threshold <= REFINED_MAX_THRESHOLD + 1e-9

RECIPES: dict[str, MapConfig] = {
    "plain": MapConfig(),
    "contrast": MapConfig(contrast=True),
    "flip": MapConfig(tta_flip=True),
    "flip-contrast": MapConfig(tta_flip=True, contrast=True),
    "tta": MapConfig(tta_flip=True, tta_scales=(0.75, 1.0, 1.25)),
    "layers-geo": MapConfig(layer_fusion="geometric"),
    "layers-mean": MapConfig(layer_fusion="mean"),
    "guided": MapConfig(refine="guided"),
    "layers-geo+guided": MapConfig(layer_fusion="geometric", refine="guided"),
    "all": MapConfig(tta_flip=True, tta_scales=(0.75, 1.0, 1.25), layer_fusion="geometric", refine="guided"),
}


# What calibration's cost limits are counted in: the members' plain forward pass, 1.0 (pixelvote's core costs
# about that, bench/speed.py). Each extra view (flip, scale) is one more pass and layer fusion makes each pass
# ~1.5x (a gradient to an earlier layer). The steps that do not scale with the members (the guided filter,
# the colour prior, the dense CRF) are timed in ms per image and divided by the members' own forward time.
# Fixed tables rather than timings, so that a run's choice does not depend on how busy the machine was:
# `python bench/cost_table.py` on a 2-core CPU (batch 8, 224 px, the CRF in its worker processes as annotate
# runs it), each figure the fastest of its 9 rounds in 4 runs (other work only ever slows a step down).
FORWARD_MS: dict[str, float] = {
    "efficientnet_lite0": 11.3, "efficientnet_lite1": 16.0, "efficientnet_lite2": 15.4,
    "efficientnet_lite0_os16": 15.7, "efficientnet_lite1_os16": 20.8, "efficientnet_lite2_os16": 22.7,
    "efficientnet_b0": 15.0, "resnet50": 57.5, "densenet121": 43.5,
}
# the dense CRF: fixed + pixels * (per pixel + per pixel and iteration * iterations), pixels in units of
# 128 x 128 (the size it runs at: its longer side, never more than the map's); a least-squares fit over
# 128-224 px and 1-15 iterations
CRF_MS = (0.62, 4.90, 0.854)
GUIDED_MS = 11.0  # the guided filter on three members' maps at 224 px (in proportion to the members)
COLOUR_MS = 0.45  # the colour prior: a table lookup and a power per pixel of the map at 224 px
TONE_MS = 1.4  # the tone map: two Gaussian blurs of the grey image (the wide one at a quarter size), a power
REFERENCE_PRESET = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@dataclass(frozen=True)
class CostBasis:
    """What one plain analysis costs: the members' forward pass, ms per image at ``image_size`` on the
    reference CPU, how many members make it (the guided filter runs on each one's map), and where that
    figure came from."""

    forward_ms: float
    image_size: int
    source: str
    members: int = len(REFERENCE_PRESET)


REFERENCE = CostBasis(sum(FORWARD_MS[n] for n in REFERENCE_PRESET), 224,
                      "the offline preset at 224 px (FORWARD_MS)")


def cost_basis(members: Iterable[str], image_size: int) -> CostBasis:
    """The members' forward time from :data:`FORWARD_MS`, in proportion to the input's pixels. A member the
    table does not know (a backbone registered elsewhere) makes it the ``offline`` preset's at the same
    input size: the extra steps are then priced at the run's own size against a forward pass of that size."""
    names = list(members)
    scale = (image_size / 224) ** 2
    unknown = [n for n in names if n not in FORWARD_MS]
    if unknown or not names:
        return CostBasis(REFERENCE.forward_ms * scale, image_size,
                         f"the offline preset at {image_size} px (FORWARD_MS): no timing for "
                         f"{', '.join(unknown) or 'an empty ensemble'}", max(1, len(names)))
    ms = sum(FORWARD_MS[n] for n in names) * scale
    return CostBasis(ms, image_size, f"the members' forward pass at {image_size} px (FORWARD_MS)", len(names))


def crf_ms(iterations: int, size: int, image_size: int = 224) -> float:
    """The dense CRF's time per image (:data:`CRF_MS`) at ``size`` px, on maps of ``image_size`` px."""
    fixed, per_pixel, per_iteration = CRF_MS
    pixels = (min(size, image_size) / 128) ** 2
    return fixed + pixels * (per_pixel + per_iteration * iterations)


def relative_cost(maps: MapConfig, refine: str = "none", crf_iterations: int = 5,
                  crf_size: int = 128, basis: CostBasis = REFERENCE) -> float:
    """Approximate annotation cost of a recipe in plain analyses of ``basis`` (1.0 ~ one forward pass of the
    members; see :data:`FORWARD_MS`): its views, plus the guided filter and the dense CRF (``refine="crf"``,
    ``crf_iterations`` at ``crf_size`` px) at their measured times over the members' forward time."""
    views = len(tuple(maps.tta_scales)) * (2 if maps.tta_flip else 1)
    cost = views * (1.5 if maps.layer_fusion != "none" else 1.0)
    pixels = (basis.image_size / 224) ** 2
    extra_ms = GUIDED_MS * pixels * basis.members / 3 if maps.refine == "guided" else 0.0
    if refine == "crf":
        extra_ms += crf_ms(crf_iterations, crf_size, basis.image_size)
    return cost + extra_ms / basis.forward_ms


def colour_cost(basis: CostBasis = REFERENCE) -> float:
    """The colour prior's cost in plain analyses of ``basis``."""
    return COLOUR_MS * (basis.image_size / 224) ** 2 / basis.forward_ms


def tone_cost(basis: CostBasis = REFERENCE) -> float:
    """The tone map's cost in plain analyses of ``basis``."""
    return TONE_MS * (basis.image_size / 224) ** 2 / basis.forward_ms


def variant_cost(maps: MapConfig, fusion: str, base: CRFConfig | None = None,
                 basis: CostBasis = REFERENCE) -> float:
    """:func:`relative_cost` of ``maps`` + ``fusion`` in plain analyses of ``basis``, with the CRF
    iterations and size the fusion names (else ``base``'s)."""
    base = base or CRFConfig()
    iterations = crf_iterations(fusion) or base.iterations
    colour = colour_cost(basis) if colour_weight(fusion) else 0.0
    colour += tone_cost(basis) if tone_weight(fusion) else 0.0
    return relative_cost(maps, split_fusion(fusion)[1], iterations, crf_size(fusion) or base.size,
                         basis) + colour


def split_fusion(fusion: str) -> tuple[str, str]:
    """``"mean+crf"`` -> ``("mean", "crf")``; ``"mean"`` -> ``("mean", "none")`` (the colour prior's weight
    ``*colour:0.75``, the tone map's ``*tone:0.5``, the CRF's settings ``:30:10`` and an ``@members``
    suffix, see :func:`fusion_settings`, are dropped)."""
    name, _, refine = fusion.partition("@")[0].partition("+")
    return name.partition("*")[0], refine.partition(":")[0] or "none"


def _prior_weight(fusion: str, prior: str) -> float | None:
    head = fusion.partition("@")[0].partition("+")[0]
    for part in head.split("*")[1:]:
        name, _, weight = part.partition(":")
        if name == prior:
            return float(weight)
    return None


def colour_weight(fusion: str) -> float | None:
    """The colour prior's weight a fusion name sets: ``"mean*colour:0.75+crf:30:10"`` -> 0.75; None where
    it sets none (the fused map alone)."""
    return _prior_weight(fusion, "colour")


def tone_weight(fusion: str) -> float | None:
    """The tone map's weight a fusion name sets: ``"mean*colour:0.75*tone:0.5+crf:30"`` and
    ``"mean*tone:0.5"`` -> 0.5; None where it sets none."""
    return _prior_weight(fusion, "tone")


def _crf_setting(fusion: str, position: int) -> str:
    parts = fusion.partition("@")[0].partition("+")[2].split(":")
    return parts[position] if len(parts) > position else ""


def crf_weight(fusion: str) -> float | None:
    """The dense CRF's bilateral (colour) weight a fusion name sets: ``"mean+crf:30"`` and
    ``"mean+crf:30:10"`` -> 30.0; None where it sets none (the consensus's own ``crf.bilateral_compat``
    applies)."""
    weight = _crf_setting(fusion, 1)
    return float(weight) if weight else None


def crf_iterations(fusion: str) -> int | None:
    """The dense CRF's mean-field iterations a fusion name sets: ``"mean+crf:30:10"`` -> 10; None where it
    sets none (the consensus's own ``crf.iterations`` applies)."""
    iterations = _crf_setting(fusion, 2)
    return int(iterations) if iterations else None


def crf_cutoff(fusion: str) -> float | None:
    """The cutoff on the dense CRF's object probability a fusion name sets: ``"mean+crf:30:10:0.3"`` -> 0.3;
    None where it sets none (the consensus's own ``crf.cutoff`` applies)."""
    cutoff = _crf_setting(fusion, 3)
    return float(cutoff) if cutoff else None


def crf_size(fusion: str) -> int | None:
    """The size the dense CRF runs at (the longer side, px) a fusion name sets: ``"mean+crf:30:10:0.3:160"``
    -> 160; None where it sets none (the consensus's own ``crf.size`` applies)."""
    size = _crf_setting(fusion, 4)
    return int(size) if size else None


def without_iterations(fusion: str) -> str:
    """The fusion name without its CRF iterations and cutoff: ``"mean+crf:30:10:0.3@agreeing"`` ->
    ``"mean+crf:30@agreeing"``, ``"mean+crf:30:10:0.3:160"`` -> ``"mean+crf:30:::160"`` (the fusions
    calibration refines in one pass of the CRF)."""
    head, at, members = fusion.partition("@")
    name, plus, refine = head.partition("+")
    parts = refine.split(":")
    kept = parts[:2] + (["", "", parts[4]] if len(parts) > 4 and parts[4] else [])
    return name + plus + ":".join(kept) + at + members


def fusion_settings(fusion: str) -> dict[str, str]:
    """The consensus fields a fusion name stands for: ``"mean+crf:30:10@agreeing"`` -> fusion mean, refine
    crf, labelled_members agreeing (which members fuse for labelled images; default all); the CRF weight (30)
    and iterations (10) and the colour prior's weight (``"mean*colour:0.75"``) are applied by
    :func:`consensus_update`."""
    name, refine = split_fusion(fusion)
    return {"fusion": name, "refine": refine, "labelled_members": fusion.partition("@")[2] or "all"}


def crf_fusions(weights: Sequence[float], iterations: Sequence[int] = (),
                cutoffs: Sequence[float] = (), sizes: Sequence[int] = (), *,
                own_size: int | None = None, map_size: int | None = None) -> list[str]:
    """The CRF-refined fusions tried with each bilateral weight (and each iteration count, each cutoff on
    the CRF's object probability and each size the CRF runs at, where given): ``intersection+crf:10``,
    ``mean+crf:30``..., ``mean+crf:30:10``..., ``mean+crf:30:10:0.3``... or ``mean+crf:30:10:0.3:160``...
    Sizes that are only the consensus's ``own_size`` are not named (the names stay those of a run without
    the choice). The CRF never runs larger than the maps: sizes at or above ``map_size`` are one candidate,
    at ``map_size``."""
    if map_size is not None:
        sizes = sorted({min(z, map_size) for z in sizes})
        own_size = None if own_size is None else min(own_size, map_size)
    if own_size is not None and list(sizes) == [own_size]:
        sizes = ()
    if cutoffs and not iterations:
        raise ValueError("CRF cutoffs are named after the iterations: give both")
    if sizes and not cutoffs:
        raise ValueError("CRF sizes are named after the iterations and cutoffs: give all three")
    settings = ([f"{w:g}:{n}" for w in weights for n in iterations] if iterations
                else [f"{w:g}" for w in weights])
    if cutoffs:
        settings = [f"{s}:{c:g}" for s in settings for c in cutoffs]
    if sizes:
        settings = [f"{s}:{z}" for s in settings for z in sizes]
    return [f"{f}+crf:{s}" for f in ("intersection", "mean") for s in settings]


def colour_fusions(weights: Sequence[float], refined: Sequence[str] = ()) -> list[str]:
    """The mean fusions with the colour prior at each weight: ``mean*colour:0.75``, and with each CRF
    setting of the mean fusions in ``refined`` (``mean*colour:0.75+crf:30:10``)."""
    crfs = [f.partition("+")[2] for f in refined if split_fusion(f)[0] == "mean"]
    return [f"mean*colour:{w:g}{suffix}" for w in weights for suffix in ["", *(f"+{c}" for c in crfs)]]


def tone_fusions(weights: Sequence[float], fusions: Sequence[str]) -> list[str]:
    """The mean fusions of ``fusions`` (plain, coloured, refined) with the tone map at each weight:
    ``mean*tone:0.5``, ``mean*colour:0.75*tone:0.5+crf:30:10``."""
    out = []
    for f in fusions:
        if split_fusion(f)[0] != "mean" or tone_weight(f) is not None:
            continue
        head, plus, rest = f.partition("+")
        out += [f"{head}*tone:{w:g}{plus}{rest}" for w in weights]
    return out


def consensus_update(base: ConsensusConfig, fusion: str) -> dict[str, Any]:
    """The update of ``base`` that makes masks as ``fusion`` names them: :func:`fusion_settings`, the colour
    prior's weight of :func:`colour_weight` (0 where the name sets none), and ``base.crf`` with the bilateral
    weight of :func:`crf_weight`, the iterations of :func:`crf_iterations`, the cutoff of :func:`crf_cutoff`
    and the size of :func:`crf_size` where the name sets them (its own settings where it sets none)."""
    update: dict[str, Any] = dict(fusion_settings(fusion))
    update["colour_weight"] = colour_weight(fusion) or 0.0
    update["tone_weight"] = tone_weight(fusion) or 0.0
    crf_update: dict[str, Any] = {}
    if (weight := crf_weight(fusion)) is not None:
        crf_update["bilateral_compat"] = weight
    if (iterations := crf_iterations(fusion)) is not None:
        crf_update["iterations"] = iterations
    if (cutoff := crf_cutoff(fusion)) is not None:
        crf_update["cutoff"] = cutoff
    if (size := crf_size(fusion)) is not None:
        crf_update["size"] = size
    # always set, so that a recipe made from another's consensus does not keep that one's CRF settings
    update["crf"] = base.crf.model_copy(update=crf_update)
    return update


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8 model inputs
    labels: torch.Tensor  # (B,) true class indices
    masks: list[torch.Tensor | None]  # truth at the original size (bool), None where there is none
    seeds: list[int]


def iou_over_grid(score: torch.Tensor, truth: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """IoU of ``score > t`` with ``truth`` for each t; ``(len(grid),)``. Empty vs empty counts as 1."""
    t = torch.tensor(grid, device=score.device).view(-1, 1)
    return _ious(score.flatten().unsqueeze(0) > t, truth)


def _ious(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of each row of ``pred (K, N)`` bool with the flattened ``truth``; ``(K,)``, empty vs empty 1."""
    g = truth.flatten().to(pred.device).unsqueeze(0)
    inter = (pred & g).sum(1).float()
    union = (pred | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).cpu()


@dataclass
class VariantTable:
    maps: MapConfig
    fusion: str
    ious: torch.Tensor  # (N, len(grid)) for images with a non-background truth mask
    seconds_per_image: float


def collect(ens: Ensemble, batches: Iterable[Batch], recipes: dict[str, MapConfig], *,
            fusions: Sequence[str] = ("intersection", "mean", "vote"), base: ConsensusConfig | None = None,
            mc_samples: int = 1, grid: Sequence[float] = GRID,
            segmenter: torch.nn.Module | None = None, segmenter_crf_threshold: float = 0.5,
            segmenter_crf: CRFConfig | None = None,
            given_labels: bool = False) -> dict[tuple[str, str], VariantTable]:
    """IoU tables for every recipe x fusion on the images of ``batches`` that have a foreground mask.
    A fusion may carry a refinement, ``"mean+crf"``, ``"mean+crf:30"`` or ``"mean+crf:30:10"`` (see
    :func:`consensus_update`); a row's time is the analysis plus that consensus (within
    ``crf.reuse(steps=...)`` the CRF pass that serves several iteration counts is timed for the largest).
    With ``segmenter`` a ("segmenter", "-") row is added: its probability map, gated like every other row
    by the ensemble's diagnosis (a background diagnosis gives an empty mask); and, where pydensecrf2 is
    installed, ("segmenter", "crf"): that map refined by the dense CRF (``segmenter_crf``, else
    ``base.crf``) with ``segmenter_crf_threshold`` as the undecided probability (the segmenter's
    ``crf_threshold``), scored over the grid of cutoffs on the refined probability. ``given_labels``:
    score masks as ``annotate --labels`` makes them (the batch's labels decide, not the diagnosis)."""
    return collect_modes(ens, batches, recipes, {given_labels: fusions}, base=base, mc_samples=mc_samples,
                         grid=grid, segmenter=segmenter,
                         segmenter_crf_threshold=segmenter_crf_threshold,
                         segmenter_crf=segmenter_crf)[given_labels]


def collect_modes(ens: Ensemble, batches: Iterable[Batch], recipes: dict[str, MapConfig],
                  fusions: dict[bool, Sequence[str]], *, base: ConsensusConfig | None = None,
                  mc_samples: int = 1, grid: Sequence[float] = GRID,
                  segmenter: torch.nn.Module | None = None, segmenter_crf_threshold: float = 0.5,
                  segmenter_crf: CRFConfig | None = None,
                  ) -> dict[bool, dict[tuple[str, str], VariantTable]]:
    """:func:`collect` for both ways of scoring masks in one pass: ``fusions`` maps ``given_labels`` (False:
    gated by the diagnosis; True: as ``annotate --labels`` makes them) to the fusions scored that way. The
    labels only change which class is explained for an image the ensemble diagnoses as background, and not
    even then where its label is the finding the ensemble finds most probable (always, with one finding
    class), so one analysis per recipe and batch usually serves both; the batch is analysed again only
    where the explained classes differ."""
    import time

    base = base or ConsensusConfig()
    bg = ens.background_index
    rows: dict[tuple[bool, str, str], list[torch.Tensor]] = {
        (mode, r, f): [] for mode, fs in fusions.items() for r in recipes for f in fs}
    seconds = {(mode, r): 0.0 for mode in fusions for r in recipes}
    seg_rows = [("segmenter", "-")]
    if segmenter is not None and crf.available():
        seg_rows.append(("segmenter", "crf"))
    if segmenter is not None:
        for mode in fusions:
            for key in seg_rows:
                rows[(mode, *key)] = []
            seconds[(mode, "segmenter")] = 0.0
    # the same fusion in both modes, and a fusion of the agreeing members beside that of all, one after
    # the other: where they fuse the same maps, crf.reuse() finds the CRF's result still held; fusions that
    # differ only in the CRF's iterations are refined together (see _refined_rows)
    groups: dict[tuple[bool, str], list[str]] = {}
    for mode, fs in fusions.items():
        for f in fs:
            groups.setdefault((mode, without_iterations(f)), []).append(f)
    ordered = sorted(groups, key=lambda g: (g[1].partition("@")[0], g[1], g[0]))
    n_images = 0
    for batch in batches:
        use = [i for i, m in enumerate(batch.masks) if m is not None and int(batch.labels[i]) != bg]
        if not use:
            continue
        n_images += len(use)
        imgs = batch.images[use]
        seeds = [batch.seeds[i] for i in use]
        fg: dict[bool, torch.Tensor] = {}
        for rname, rcfg in recipes.items():
            analyses: dict[bool, Analysis] = {}
            took = 0.0
            for mode in sorted(fusions, reverse=True):  # with the labels first: it may serve both
                if not mode and True in analyses and _same_target(analyses[True], bg):
                    analyses[mode] = dataclasses.replace(analyses[True], given=None)
                else:
                    t0 = time.perf_counter()
                    given = batch.labels[use] if mode else None
                    analyses[mode] = analyze(ens, imgs, mc_samples=mc_samples, seeds=seeds, maps=rcfg,
                                             given=given)
                    took = time.perf_counter() - t0
                seconds[(mode, rname)] += took  # a shared analysis costs each way what it cost once
            for mode, a in analyses.items():
                fg[mode] = (a.label if not mode else batch.labels[use].to(a.label.device)) != bg
            for mode, group in ordered:
                a = analyses[mode]
                # the most iterations first: with crf.reuse(steps=...) its pass serves the others
                members = sorted(groups[(mode, group)], key=lambda f: -(crf_iterations(f) or 0))
                configs = [base.model_copy(update=consensus_update(base, f)) for f in members]
                if configs[0].soft_fused:  # the CRF: one pass per threshold
                    refined, spent_by = _refined_rows(a, configs, bg, batch, use, grid, ens.resize)
                    passes = sum(map(refined_at, grid)) if configs[0].refine == "crf" else 1
                    for fusion, fusion_rows, spent in zip(members, refined, spent_by, strict=True):
                        rows[(mode, rname, fusion)] += fusion_rows
                        step = (mode, f"{rname}+{fusion}")
                        seconds[step] = seconds.get(step, 0.0) + spent / max(1, passes)
                    continue
                for fusion, settings in zip(members, configs, strict=True):
                    t0 = time.perf_counter()
                    at_zero = {"threshold_method": "fixed", "threshold": 1e-6}
                    res = apply_consensus(a, settings.model_copy(update=at_zero), bg)
                    step = (mode, f"{rname}+{fusion}")
                    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - t0
                    for j, truth in _truths(batch, use):
                        score = at_size(res.margin[j], truth, ens.resize)
                        rows[(mode, rname, fusion)].append(iou_over_grid(score, truth, grid))
        if segmenter is not None:
            from pixelvote.segment.train import predict

            t0 = time.perf_counter()
            prob = predict(segmenter, imgs)
            seg_seconds = time.perf_counter() - t0
            probs = {("segmenter", "-"): prob}
            crf_seconds = 0.0
            if ("segmenter", "crf") in seg_rows:
                t0 = time.perf_counter()
                probs[("segmenter", "crf")] = crf.dense_crf(prob, imgs, segmenter_crf or base.crf,
                                                            threshold=segmenter_crf_threshold)
                crf_seconds = time.perf_counter() - t0
            for mode in fusions:
                seconds[(mode, "segmenter")] += seg_seconds
                seconds[(mode, "segmenter+crf")] = seconds.get((mode, "segmenter+crf"), 0.0) + crf_seconds
                if mode not in fg:
                    fg[mode] = (batch.labels[use] if mode else
                                analyze(ens, imgs, mc_samples=1, seeds=seeds).label) != bg
                for key, p in probs.items():
                    for j, truth in _truths(batch, use):
                        score = at_size(p[j], truth, ens.resize)
                        if not bool(fg[mode][j]):
                            score = torch.zeros_like(score)
                        rows[(mode, *key)].append(iou_over_grid(score, truth, grid))
    out: dict[bool, dict[tuple[str, str], VariantTable]] = {mode: {} for mode in fusions}
    for (mode, r, f), lst in rows.items():
        ious = torch.stack(lst) if lst else torch.zeros(0, len(grid))
        secs = seconds[(mode, r)] + seconds.get((mode, f"{r}+{f}"), 0.0)
        out[mode][(r, f)] = VariantTable(recipes.get(r, MapConfig()), f, ious, secs / max(n_images, 1))
    return out


def _same_target(a: Analysis, bg: int) -> bool:
    """Whether the classes explained in ``a`` (analysed with the images' labels) are those the diagnosis
    alone would have chosen (see :func:`pixelvote.explain.analyze.analyze`)."""
    return torch.equal(explained_class(a.ensemble_probs, a.label, bg), a.target)


def _refined_rows(a: Analysis, configs: Sequence[ConsensusConfig], bg: int, batch: Batch, use: list[int],
                  grid: Sequence[float], resize: str = "squash",
                  ) -> tuple[list[list[torch.Tensor]], list[float]]:
    """For each consensus of ``configs`` (fused as one soft map: the dense CRF, whose refinement runs once
    per threshold, or the colour prior): the IoU rows ``(len(grid),)`` per image, for the CRF NaN above
    :data:`REFINED_MAX_THRESHOLD`, and the seconds its passes took. The fused map and the images' colours at
    the CRF's size are made once for every threshold and every config that shares them (its fusion, colour
    prior and CRF size: :func:`pixelvote.consensus.soft_margins`); the configs take turns at each threshold,
    so that passes on the same fused map follow each other, and those that differ only in the CRF's cutoff
    share its result."""
    import time

    spent = [0.0 for _ in configs]
    fused: list[SoftMargins] = []
    for c, cfg in enumerate(configs):
        t0 = time.perf_counter()
        fused.append(next((f for f in fused if f.serves(cfg)), None) or soft_margins(a, cfg, bg))
        spent[c] += time.perf_counter() - t0
    per_t: list[list[torch.Tensor | None]] = [[] for _ in configs]
    for t in grid:
        for c, base in enumerate(configs):
            if base.refine == "crf" and not refined_at(t):
                per_t[c].append(None)
                continue
            t0 = time.perf_counter()
            cfg = base.model_copy(update={"threshold_method": "fixed", "threshold": t})
            per_t[c].append(fused[c].margin(cfg))
            spent[c] += time.perf_counter() - t0
    rows = [[_margin_ious(margins, j, truth, resize) for j, truth in _truths(batch, use)]
            for margins in per_t]
    return rows, spent


def _margin_ious(margins: list[torch.Tensor | None], j: int, truth: torch.Tensor,
                 resize: str = "squash") -> torch.Tensor:
    """The IoU of image ``j``'s mask (``margin > 0``) at each threshold's margin (NaN where None), the
    margins resized to the truth in one call."""
    out = torch.full((len(margins),), float("nan"))
    done = [i for i, m in enumerate(margins) if m is not None]
    if not done:
        return out
    scores = at_size(torch.stack([margins[i][j] for i in done]), truth, resize)
    out[done] = _ious((scores > 0).flatten(1), truth)
    return out


def _truths(batch: Batch, use: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(row in the analysed sub-batch, truth mask) of each used image."""
    for j, i in enumerate(use):
        truth = batch.masks[i]
        assert truth is not None
        yield j, truth


def at_size(score: torch.Tensor, truth: torch.Tensor, resize: str = "squash") -> torch.Tensor:
    """A map ``(S, S)`` (or an image's maps ``(K, S, S)``) on the model input resized bilinearly to the
    truth's size: the original image's (the part of the input that covers it, see
    :func:`pixelvote.data.transforms.crop_content`), or the input's own for a truth already placed on it
    (train's cached validation masks; nothing is cropped then)."""
    size = (int(truth.shape[0]), int(truth.shape[1]))
    score = crop_content(score, size, resize)
    if tuple(score.shape[-2:]) == size:  # bilinear to the same size changes nothing (tested); skip it
        return score
    if score.dim() == 3:  # several maps of one image
        return F.interpolate(score[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.interpolate(score[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def best_cell(tables: dict[tuple[str, str], VariantTable], rows: torch.Tensor | None = None,
              keys: Iterable[tuple[str, str]] | None = None) -> tuple[tuple[str, str], int, float]:
    """The (variant, threshold index) with the best mean IoU over ``rows`` (default: all images)."""
    best: tuple[tuple[str, str], int, float] = (next(iter(tables)), 0, -1.0)
    for key in keys or tables:
        t = tables[key].ious
        sub = t if rows is None else t[rows]
        if len(sub) == 0:
            continue
        means = sub.mean(0).nan_to_num(-1.0)  # thresholds not tried
        j = int(means.argmax())
        if float(means[j]) > best[2]:
            best = (key, j, float(means[j]))
    return best


def cross_fitted(tables: dict[tuple[str, str], VariantTable], keys: Iterable[tuple[str, str]] | None = None,
                 *, seed: int = 0) -> tuple[float, list[tuple[tuple[str, str], float]]]:
    """Mean IoU when the variant and threshold are chosen on one half of the images and scored on the
    other (both ways). Returns the score and the two choices."""
    keys = list(keys or tables)
    n = len(tables[keys[0]].ious)
    if n < 2:
        return float("nan"), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (perm[: n // 2], perm[n // 2:])
    total, choices = 0.0, []
    for pick, score in (halves, halves[::-1]):
        key, j, _ = best_cell(tables, pick, keys)
        total += float(tables[key].ious[score, j].sum())
        choices.append((key, GRID[j]))
    return total / n, choices
