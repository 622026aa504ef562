"""Mask-quality ablation on the real sets in ../shared/data: which map recipe, fusion and threshold help?

    python bench/ablation.py --runs-dir runs/bench [--sets busi,fire] [--epochs 6] [--image-size 224]
        [--augment robust] [--resize letterbox] [--labels] [--crf-sizes 128,160]
        [--stage-two [--seg-method best|run] [--seg-epochs 30]]

For each set it trains the default ensemble (``--preset``) once (or reuses RUNS_DIR/<set>), takes the
run's validation split (images the models never trained on; fire is split by video), and prints mean IoU on
validation images with masks for: the centred-box prior; a single member's XGrad-CAM; the paper's
intersection at a fixed 0.5 threshold; the same with the threshold chosen on validation; each map
refinement; each fusion; and the variant chosen by the data. Every "chosen" figure is cross-fitted: chosen
on one half of the validation images and scored on the other half (both ways), so it is not tuned on what
it reports.
Time per image is the analysis time (all members, CPU unless CUDA is present).
``--labels`` scores the masks as ``annotate --labels`` makes them for labelled images (each image explained
for its own class; the diagnosis no longer gates the mask); stage two's training split is always annotated
that way, since its labels are known. Fire trains with ``--train-exclude '^Video'``: the video frames are the
only fire-only source, so they are kept out of training (see the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.consensus import ConsensusConfig  # noqa: E402
from pixelvote.data.imageio import read_image, read_mask  # noqa: E402
from pixelvote.data.transforms import fit_image, to_tensor  # noqa: E402
from pixelvote.evaluate.selection import (  # noqa: E402
    GRID,
    RECIPES,
    Batch,
    VariantTable,
    at_size,
    best_cell,
    collect,
    colour_fusions,
    cost_basis,
    crf_fusions,
    cross_fitted,
    tone_fusions,
    variant_cost,
)
from pixelvote.explain.analyze import MapConfig, analyze  # noqa: E402
from pixelvote.models.checkpoint import load_run  # noqa: E402
from pixelvote.models.ensemble import Ensemble  # noqa: E402
from pixelvote.models.registry import DEFAULT_PRESET  # noqa: E402
from pixelvote.refine import crf  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PAPER = {"busi": "(paper: no BUSI figure)", "fire": "paper: accuracy 96.4%, IoU 64.7%"}
SETS = {
    "busi": dict(background="normal", group_pattern=None),
    "fire": dict(background="no_fire", group_pattern=r"^(Video\d+)", train_exclude=r"^Video"),
}


def ensure_run(name: str, runs: Path, epochs: int, size: int, seed: int, preset: str = DEFAULT_PRESET,
               **train_options: str) -> Path:
    """The set's run, trained unless it exists: RUNS/<set>[-<preset>][-<option value>...] (e.g. fire-letterbox
    for ``resize="letterbox"``; options at their defaults add nothing)."""
    from pixelvote.train.config import TrainConfig

    defaults = TrainConfig.model_fields
    suffix = "".join(f"-{v}" for k, v in train_options.items() if v != defaults[k].default)
    run = runs / ((name if preset == DEFAULT_PRESET else f"{name}-{preset}") + suffix)
    if (run / "calibration.json").exists():
        return run
    from pixelvote.train.loop import train

    cfg = TrainConfig(data=DATA / name, out=run, epochs=epochs, image_size=size, seed=seed, preset=preset,
                      **SETS[name], **train_options)
    return train(cfg, resume=(run / "train_config.json").exists())


def val_batches(run: Path, ens: Ensemble, batch_size: int = 8):  # type: ignore[no-untyped-def]
    split = json.loads((run / "split.json").read_text())
    items = []
    for p in map(Path, split["val"]):
        label = p.parent.name
        mask_path = p.parents[2] / "masks" / label / (p.stem + ".png")
        items.append((p, ens.classes.index(label), mask_path if mask_path.exists() else None))
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        imgs, labels, masks, seeds = [], [], [], []
        for p, lab, mp in chunk:
            img = read_image(p)
            imgs.append(fit_image(to_tensor(img), ens.image_size, ens.resize))
            labels.append(lab)
            masks.append(None if mp is None
                         else torch.from_numpy(read_mask(mp, (img.shape[1], img.shape[0]))))
            seeds.append(zlib.crc32(p.name.encode()))
        yield Batch(torch.stack(imgs), torch.tensor(labels), masks, seeds)


def run_priors(run: Path, ens: Ensemble, cfg, colour: bool, tone: bool):  # type: ignore[no-untyped-def]
    """The run's colour prior and the findings' tone (None where not asked for), or, for a run calibrated
    before pixelvote learned them, learned as `train` learns them from the run's training images."""
    from pixelvote.data.dataset import Sample
    from pixelvote.train.cache import cache_samples
    from pixelvote.train.calibrate import training_priors

    prior = cfg.consensus.colour_prior if colour else None
    found = cfg.consensus.tone if tone else None
    if (colour and prior is None) or (tone and found is None):
        paths = [Path(p) for p in json.loads((run / "split.json").read_text())["train"]]
        train = cache_samples([Sample(p, p.parent.name) for p in paths], ens.classes, cfg.image_size,
                              desc="training images", with_masks=False, resize=ens.resize)
        learned, learned_tone, _ = training_priors(ens, train, 8, colour=colour and prior is None,
                                                   tone=tone and found is None)
        prior, found = prior or learned, found or learned_tone
    return prior, found


def centred_box_iou(run: Path, ens: Ensemble) -> float:
    vals = []
    for b in val_batches(run, ens):
        for m, lab in zip(b.masks, b.labels, strict=True):
            if m is None or int(lab) == ens.background_index:
                continue
            h, w = m.shape
            box = torch.zeros_like(m)
            box[h // 4: h - h // 4, w // 4: w - w // 4] = True
            union = (box | m).sum()
            vals.append(float((box & m).sum() / union) if union else 1.0)
    return sum(vals) / max(len(vals), 1)


def stage_two(run: Path, runs: Path, epochs: int, size: int, method: str = "best",  # type: ignore[no-untyped-def]
              encoder: str = "efficientnet_lite0", seg_dir: Path | None = None):
    """Annotate the training split (with its labels, and the images --train-exclude kept out of training)
    with the run's ``method`` recipe (annotate --labels --method), then train the segmenter (on an
    ``encoder`` backbone) on those masks. With ``seg_dir`` holding a trained segmenter, that one instead."""
    from pixelvote.engine.annotate import annotate
    from pixelvote.segment.train import SegConfig, calibrate_segmenter, load_segmenter, train_segmenter

    if seg_dir is not None:
        if not (seg_dir / "segmenter.json").exists():
            raise SystemExit(f"{seg_dir}: not a segmenter (no segmenter.json); pass a `pixelvote segment "
                             "train --out` folder")
        if not (seg_dir / "calibration.json").exists():
            calibrate_segmenter(seg_dir, run)
        return load_segmenter(seg_dir)
    default_encoder = SegConfig.model_fields["encoder"].default
    seg_dir = runs / (f"{run.name}-segmenter-labelled{'' if method == 'run' else '-' + method}"
                      f"{'' if encoder == default_encoder else '-' + encoder}")
    if not (seg_dir / "segmenter.json").exists():
        split = json.loads((run / "split.json").read_text())
        csv = runs / f"{run.name}-train-labelled.csv"
        train = split["train"] + split.get("excluded_from_training", [])
        csv.write_text("path,label\n" + "".join(f'"{p}",{Path(p).parent.name}\n' for p in train))
        annot = runs / f"{run.name}-train-annotations-labelled{'' if method == 'run' else '-' + method}"
        # shared by the segmenters of every encoder (annotate resumes: done images are kept)
        annotate(run, csv, annot, batch_size=8, mc_samples=8, method=method, labels=True)
        train_segmenter(annot, seg_dir, run=run,
                        cfg=SegConfig(epochs=epochs, image_size=size, encoder=encoder))
    elif not (seg_dir / "calibration.json").exists():  # trained before segment train chose its thresholds
        calibrate_segmenter(seg_dir, run)
    return load_segmenter(seg_dir)


def segmenter_crf_table(run: Path, ens: Ensemble, model, crf_cfg, labels: bool):  # type: ignore[no-untyped-def]
    """IoU of the segmenter's CRF-refined masks at every unary threshold, per validation image (gated by the
    ensemble's diagnosis unless ``labels``), one table per (iterations, cutoff) that segment train tries, as
    it scores them: for a cross-fitted choice."""
    from pixelvote.segment.calibrate import iou_rows, iteration_candidates
    from pixelvote.segment.train import predict

    rows: dict[tuple[int, float], list[torch.Tensor]] = {}
    for batch in val_batches(run, ens):
        bg = ens.background_index
        use = [i for i, m in enumerate(batch.masks) if m is not None and int(batch.labels[i]) != bg]
        if not use:
            continue
        imgs = batch.images[use]
        fg = (batch.labels[use] if labels else analyze(ens, imgs, mc_samples=1).label) != bg
        _, refined = iou_rows(predict(model, imgs).float().cpu(), imgs, [batch.masks[i] for i in use],
                              lambda s, t: at_size(s, t, ens.resize), crf_cfg,
                              iterations=iteration_candidates(crf_cfg))
        for key, r in refined.items():
            rows.setdefault(key, []).append(r * fg.float().view(-1, 1))
    return {("segmenter", f"crf {n} it, cutoff {c}"): VariantTable(MapConfig(), "crf", torch.cat(r), 0.0)
            for (n, c), r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--sets", default="busi,fire")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default=DEFAULT_PRESET, help="the ensemble to train (runs of another preset "
                    "than the default go to RUNS_DIR/<set>-<preset>)")
    ap.add_argument("--resize", default="squash",
                    help="train --resize for the runs (letterbox: RUNS_DIR/<set>-letterbox)")
    ap.add_argument("--augment", default="standard",
                    help="train --augment for the runs (robust: RUNS_DIR/<set>-robust)")
    ap.add_argument("--recipes", default="plain,flip,tta,layers-geo,layers-mean,guided,all")
    ap.add_argument("--max-cost", type=float, default=2.0, help="the default is chosen among recipes costing "
                    "at most this many plain analyses (pixelvote train --max-map-cost)")
    ap.add_argument("--labels", action="store_true", help="score masks as annotate --labels makes them for "
                    "labelled images (the diagnosis does not gate them)")
    ap.add_argument("--crf-weights", default="10,30", help="the dense CRF's bilateral weights scored (rows "
                    "mean+crf:W:N)")
    ap.add_argument("--crf-iterations", default="3,5,10,15", help="the dense CRF's mean-field iterations "
                    "scored (rows mean+crf:W:N; pixelvote train --crf-iterations)")
    ap.add_argument("--crf-cutoffs", default="0.3,0.5", help="cutoffs on the dense CRF's object probability "
                    "scored (rows mean+crf:W:N:C; pixelvote train --crf-cutoffs)")
    ap.add_argument("--crf-sizes", default="128,160", help="sizes the dense CRF runs at, scored (the longer "
                    "side; with more than one, rows mean+crf:W:N:C:S; pixelvote train --crf-sizes)")
    ap.add_argument("--colour-weights", default="0.75", help="the colour prior's weights scored with the "
                    "mean fusion, alone and under each CRF setting (rows mean*colour:W; pixelvote train "
                    "--colour-weights; empty: none)")
    ap.add_argument("--tone-weights", default="0.5", help="the tone map's weights scored with every mean "
                    "fusion (rows mean*tone:W, mean*colour:W*tone:W; pixelvote train --tone-weights; empty: "
                    "none)")
    ap.add_argument("--stage-two", action="store_true",
                    help="also train and score the segmenter (slow on CPU)")
    ap.add_argument("--seg-epochs", type=int, default=30)
    ap.add_argument("--seg-encoder", default="efficientnet_lite0", help="the segmenter's encoder (segment "
                    "train --encoder; another than Lite0 trains into RUNS_DIR/<set>-segmenter-...-<encoder>)")
    ap.add_argument("--segmenter", type=Path, default=None, help="score this trained segmenter (a segment "
                    "train --out folder, e.g. a second round's) instead of training one; implies --stage-two")
    ap.add_argument("--seg-method", default="best", help="the recipe of the segmenter's pseudo-masks "
                    "(annotate --method: best, run or paper)")
    args = ap.parse_args()
    results = {}
    for name in args.sets.split(","):
        run = ensure_run(name, args.runs_dir, args.epochs, args.image_size, args.seed, args.preset,
                         augment=args.augment, resize=args.resize)
        ens, cfg = load_run(run)
        cal = json.loads((run / "calibration.json").read_text())
        # the plain maps always: the single-member and paper rows are made from them
        recipes = {k: RECIPES[k] for k in ["plain", *args.recipes.split(",")]}
        seg = (stage_two(run, args.runs_dir, args.seg_epochs, args.image_size, args.seg_method,
                         args.seg_encoder, args.segmenter)
               if args.stage_two or args.segmenter else None)
        weights = [float(w) for w in args.crf_weights.split(",")]
        counts = [int(n) for n in args.crf_iterations.split(",")]
        cutoffs = [float(c) for c in args.crf_cutoffs.split(",")]
        sizes = [int(z) for z in args.crf_sizes.split(",")]
        refined = (crf_fusions(weights, counts, cutoffs, sizes, own_size=cfg.consensus.crf.size,
                               map_size=cfg.image_size)
                   if crf.available() else [])
        colour = [float(w) for w in args.colour_weights.split(",") if w]
        toned = [float(w) for w in args.tone_weights.split(",") if w]
        prior, tone = run_priors(run, ens, cfg, bool(colour), bool(toned))
        fusions = (["intersection", "mean", "vote"] + refined
                   + (colour_fusions(colour, refined) if prior is not None else []))
        if tone is not None:
            fusions += tone_fusions(toned, fusions)
        if args.labels:  # which members fuse for labelled images: every one (default) or the agreeing ones
            fusions += [f"{f}@agreeing" for f in fusions if f.startswith("mean")]
        # the segmenter's CRF as annotate --segmenter runs it: with the run's CRF settings
        model, seg_cfg = seg if seg else (None, None)
        tables = collect(ens, val_batches(run, ens), recipes, fusions=fusions, segmenter=model,
                         segmenter_crf_threshold=seg_cfg.crf_threshold if seg_cfg else 0.5,
                         segmenter_crf=seg_cfg.crf_settings(cfg.consensus.crf) if seg_cfg else None,
                         given_labels=args.labels,
                         base=ConsensusConfig(crf=cfg.consensus.crf, colour_prior=prior, tone=tone))
        # diagnosed by the run's rule (its decision threshold, or the colour evidence), as each member votes
        single = Ensemble(ens.members[:1], ens.classes, ens.background, ens.image_size, device=ens.device,
                          resize=ens.resize, decision_threshold=ens.decision_threshold,
                          evidence_rule=ens.evidence_rule, colour_prior=ens.colour_prior)
        single_t = collect(single, val_batches(run, ens), {"plain": MapConfig()}, fusions=("intersection",),
                           given_labels=args.labels)
        i05 = GRID.index(0.5)
        n = len(tables[("plain", "intersection")].ious)
        rows = [("centred box (prior)", centred_box_iou(run, ens), None, 0.0)]
        st = single_t[("plain", "intersection")]
        rows.append((f"single {ens.members[0].name} XGrad-CAM, t=0.5", float(st.ious[:, i05].mean()), 0.5,
                     st.seconds_per_image))
        cf, _ = cross_fitted(single_t)
        rows.append((f"single {ens.members[0].name}, t chosen on val", cf, None, st.seconds_per_image))
        pt = tables[("plain", "intersection")]
        rows.append(("paper: intersection (unanimous), t=0.5", float(pt.ious[:, i05].mean()), 0.5,
                     pt.seconds_per_image))
        cam_keys = [k for k in tables if k[0] != "segmenter"]
        for (r, f), t in tables.items():
            cf, ch = cross_fitted(tables, [(r, f)])
            rows.append((f"{r} + {f}, t chosen on val", cf, None, t.seconds_per_image))
        if ("segmenter", "-") in tables:
            st = tables[("segmenter", "-")]
            rows.append(("segmenter (stage two), t=0.5", float(st.ious[:, i05].mean()), 0.5,
                         st.seconds_per_image))
            it = GRID.index(seg_cfg.threshold)
            rows.append((f"segmenter, t={seg_cfg.threshold} (chosen by segment train on these images)",
                         float(st.ious[:, it].mean()), seg_cfg.threshold, st.seconds_per_image))
            cf, _ = cross_fitted({("segmenter", "-"): st})
            rows.append(("segmenter, t chosen on val (cross-fitted)", cf, None, st.seconds_per_image))
        if ("segmenter", "crf") in tables:  # the CRF's output is a probability: its mask is > the cutoff
            st = tables[("segmenter", "crf")]
            ic = GRID.index(seg_cfg.crf_cutoff)
            rows.append((f"segmenter + dense CRF, unary t={seg_cfg.crf_threshold}, "
                         f"{seg_cfg.crf_settings(cfg.consensus.crf).iterations} iterations, cutoff "
                         f"{seg_cfg.crf_cutoff} (chosen by segment train on these images)",
                         float(st.ious[:, ic].mean()), seg_cfg.crf_cutoff, st.seconds_per_image))
            seg_crf = segmenter_crf_table(run, ens, model, cfg.consensus.crf, args.labels)
            cf, choices = cross_fitted(seg_crf)
            rows.append(("segmenter + dense CRF, unary t, iterations and cutoff chosen on val "
                         f"(cross-fitted): {choices}", cf, None, st.seconds_per_image))
        if ("segmenter", "-") in tables:
            best_cam, _ = cross_fitted(tables, cam_keys)
            rows.append(("best CAM variant, chosen on val (cross-fitted)", best_cam, None, 0.0))
        cf, choices = cross_fitted(tables, cam_keys)
        rows.append((f"best of all (cross-fitted): {choices}", cf, None, 0.0))
        basis = cost_basis([m.name for m in cfg.members], cfg.image_size)  # as train prices them
        cheap = [k for k in cam_keys
                 if variant_cost(RECIPES[k[0]], k[1], cfg.consensus.crf, basis) <= args.max_cost]
        cf, choices = cross_fitted(tables, cheap)
        key, j, full = best_cell(tables, keys=cheap)
        rows.append((f"default: chosen within cost <= {args.max_cost:g} (cross-fitted): {choices}", cf, None,
                     tables[key].seconds_per_image))
        print(f"\n## {name}: {n} validation images with masks; "
              f"ensemble val accuracy {cal['val_accuracy']:.3f}; "
              f"masks {'of labelled images (--labels)' if args.labels else 'gated by the diagnosis'}; "
              f"{PAPER[name]}")
        plain_s = tables[("plain", "intersection")].seconds_per_image
        print(f"{'method':90s} {'mean IoU':>9s} {'s/img':>7s} {'x plain':>7s}")
        for label, iou, _, sec in rows:
            print(f"{label[:90]:90s} {iou:9.3f} {sec:7.3f} {sec / plain_s if sec else 0.0:7.2f}")
        print(f"default for new runs (all validation images): {key[0]} + {key[1]}, t={GRID[j]} "
              f"(in-sample mean IoU {full:.3f})")
        results[name] = {"n": n, "val_accuracy": cal["val_accuracy"],
                         "rows": [{"method": r[0], "mean_iou": r[1], "seconds_per_image": r[3]}
                                  for r in rows],
                         "default": {"recipe": key[0], "fusion": key[1], "threshold": GRID[j]}}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
