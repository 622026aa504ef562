"""Do the masks chosen on one group (video, patient) hold on groups calibration never saw?

    python bench/cross_video.py --run runs/fire-robust [--recipes guided,plain] [--crf-weights 10,30]
        [--crf-iterations 5,15] [--crf-cutoffs 0.3,0.5] [--crf-sizes 160] [--colour-weights 0.75]
        [--refined-max 0.95] [--colour-bins 8,16] [--choose-per-group N] [--tables FILE]

Scores every candidate (map recipe x fusion x threshold, as `train` calibrates) on every image with a mask in
the run's validation split and in the images ``train --train-exclude`` kept out of training (for fire: the
frames of all eight videos, none trained on), then reports, per group and over the groups calibration never
saw:

- the choice made on the validation groups only (what `train` did before it scored kept-out images), re-made
  from the same candidates (the run's own choice is printed beside it);
- leave one group out: the choice made on every other group, scored on the one left out;
- the best candidate for each group alone (an upper bound that no calibration can reach).

``--colour-bins`` also scores the colour fusions with priors of other bin counts, each learned as `train`
learns the run's (from its training images, on the run's members); their rows are named ``RECIPE/bBINS``.

Masks are made as ``annotate`` makes them (gated by the diagnosis; ``--labels`` as ``annotate --labels``).
Grouping follows the run's ``--group-pattern``. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.consensus import ConsensusConfig  # noqa: E402
from pixelvote.data.imageio import read_image, read_mask  # noqa: E402
from pixelvote.data.transforms import fit_image, to_tensor  # noqa: E402
from pixelvote.evaluate import selection  # noqa: E402
from pixelvote.evaluate.selection import (  # noqa: E402
    GRID,
    RECIPES,
    Batch,
    VariantTable,
    best_cell,
    collect,
    colour_fusions,
    crf_fusions,
    tone_fusions,
)
from pixelvote.models.checkpoint import load_run  # noqa: E402
from pixelvote.refine import crf  # noqa: E402


def masked_items(run: Path, classes: list[str]) -> list[tuple[Path, int, Path, bool]]:
    """(image, label, truth mask, in validation) for every validation or kept-out image with a mask."""
    split = json.loads((run / "split.json").read_text())
    out = []
    for key in ("val", "excluded_from_training"):
        for p in map(Path, split.get(key, [])):
            mask = p.parents[2] / "masks" / p.parent.name / (p.stem + ".png")
            if mask.exists():
                out.append((p, classes.index(p.parent.name), mask, key == "val"))
    return out


def batches(items: list[tuple[Path, int, Path, bool]], size: int, resize: str, batch_size: int = 8):  # type: ignore[no-untyped-def]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        imgs, masks = [], []
        for p, _, mp, _ in chunk:
            img = read_image(p)
            imgs.append(fit_image(to_tensor(img), size, resize))
            masks.append(torch.from_numpy(read_mask(mp, (img.shape[1], img.shape[0]))))
        yield Batch(torch.stack(imgs), torch.tensor([lab for _, lab, _, _ in chunk]), masks,
                    [zlib.crc32(p.name.encode()) for p, _, _, _ in chunk])


def learned_priors(run: Path, ens, cfg, bins: int, colour: bool = True,  # type: ignore[no-untyped-def]
                   tone: bool = False):
    """The colour prior at ``bins`` bins per channel and the findings' tone (see
    :func:`pixelvote.train.calibrate.training_priors`), learned from the run's training images as `train`
    learns them."""
    from pixelvote.data.dataset import Sample
    from pixelvote.train.cache import cache_samples
    from pixelvote.train.calibrate import training_priors

    paths = [Path(p) for p in json.loads((run / "split.json").read_text())["train"]]
    train = cache_samples([Sample(p, p.parent.name) for p in paths], ens.classes, cfg.image_size,
                          desc="training images", with_masks=False, resize=ens.resize)
    return training_priors(ens, train, 16, bins, colour=colour, tone=tone)


def choose(tables: dict[tuple[str, str], VariantTable], rows: torch.Tensor) -> tuple[tuple[str, str], int]:
    key, j, _ = best_cell(tables, rows)
    return key, j


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--recipes", default="guided,plain")
    ap.add_argument("--crf-weights", default="10,30")
    ap.add_argument("--crf-iterations", default="5,15")
    ap.add_argument("--crf-cutoffs", default="0.3,0.5")
    ap.add_argument("--crf-sizes", default="160")
    ap.add_argument("--colour-weights", default="0.75")
    ap.add_argument("--colour-bins", default="",
                    help="also score the colour fusions with priors of these bins per channel (e.g. 8,16)")
    ap.add_argument("--tone-weights", default="",
                    help="also score every mean fusion with the tone map at these weights (e.g. 0.3,0.5); "
                         "the run's tone, or learned as train learns it")
    ap.add_argument("--labels", action="store_true", help="masks as annotate --labels makes them")
    ap.add_argument("--agreeing", action="store_true", help="with --labels, fuse the agreeing members only")
    ap.add_argument("--refined-max", type=float, default=None,
                    help="score the CRF up to this threshold (default: calibration's, "
                         "pixelvote.evaluate.selection.REFINED_MAX_THRESHOLD)")
    ap.add_argument("--choose-per-group", type=int, default=0,
                    help="choose on at most this many evenly spaced images of each group (0: all), as "
                         "train --calibration-per-group does; every image is scored")
    ap.add_argument("--tables", type=Path, default=None,
                    help="keep the scored candidates in this file, and reuse them where it exists")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images per group (0: all)")
    args = ap.parse_args(argv)

    if args.refined_max is not None:
        selection.REFINED_MAX_THRESHOLD = args.refined_max
    ens, cfg = load_run(args.run)
    pattern = re.compile(json.loads((args.run / "train_config.json").read_text()).get("group_pattern")
                         or r"^(.*)$")
    items, groups, kept = [], [], defaultdict(int)
    for it in masked_items(args.run, ens.classes):
        group = m.group(1) if (m := pattern.search(it[0].name)) else it[0].name
        kept[group] += 1
        if not args.limit or kept[group] <= args.limit:
            items.append(it)
            groups.append(group)
    in_val = torch.tensor([v for _, _, _, v in items])
    if not items or bool(in_val.all()):
        sys.exit(f"{args.run}: no masked images outside validation (train with --train-exclude)")

    names = sorted(set(groups))
    gidx = {g: torch.tensor([i for i, h in enumerate(groups) if h == g]) for g in names}
    unseen = [g for g in names if not bool(in_val[gidx[g]].any())]
    if not unseen:
        sys.exit("every group with kept-out images also has validation images: none is unseen")
    recipes = {k: RECIPES[k] for k in args.recipes.split(",")}
    refined = (crf_fusions([float(w) for w in args.crf_weights.split(",")],
                           [int(n) for n in args.crf_iterations.split(",")],
                           [float(c) for c in args.crf_cutoffs.split(",")],
                           [int(z) for z in args.crf_sizes.split(",")], map_size=cfg.image_size)
               if crf.available() and args.crf_weights else [])
    refined = [f for f in refined if f.startswith("mean")]
    colour = [float(w) for w in args.colour_weights.split(",") if w]
    prior = cfg.consensus.colour_prior
    fusions = (["intersection", "mean"] + refined
               + (colour_fusions(colour, refined) if prior is not None and colour else []))
    toned = [float(w) for w in args.tone_weights.split(",") if w]
    tone = cfg.consensus.tone
    if toned and tone is None:
        tone = learned_priors(args.run, ens, cfg, 8, colour=False, tone=True)[1]
    if toned and tone is not None:
        fusions += tone_fusions(toned, fusions)
    if args.labels and args.agreeing:
        fusions = [f"{f}@agreeing" for f in fusions if f.startswith("mean")]
    print(f"{len(items)} images with masks in {len(set(groups))} groups; {len(recipes)} recipes x "
          f"{len(fusions)} fusions x {len(GRID)} thresholds", flush=True)
    if args.tables and args.tables.exists():
        saved = torch.load(args.tables)
        if saved["images"] != [str(p) for p, _, _, _ in items]:
            sys.exit(f"{args.tables} holds other images: remove it or pass another --tables")
        keys = {k: tuple(k.split("|", 1)) for k in saved["ious"]}
        tables = {keys[k]: VariantTable(RECIPES[keys[k][0].split("/")[0]], keys[k][1], v, 0.0)
                  for k, v in saved["ious"].items()}
    else:
        with crf.reuse(steps=[int(n) for n in args.crf_iterations.split(",")]):
            tables = collect(ens, batches(items, cfg.image_size, ens.resize), recipes, fusions=fusions,
                             given_labels=args.labels,
                             base=ConsensusConfig(crf=cfg.consensus.crf, colour_prior=prior, tone=tone))
            coloured = [f for f in fusions if "colour" in f]
            for bins in [int(b) for b in args.colour_bins.split(",") if b]:
                if not coloured or (prior is not None and bins == prior.bins):
                    continue
                other = learned_priors(args.run, ens, cfg, bins)[0]
                more = collect(ens, batches(items, cfg.image_size, ens.resize), recipes, fusions=coloured,
                               given_labels=args.labels,
                               base=ConsensusConfig(crf=cfg.consensus.crf, colour_prior=other, tone=tone))
                tables.update({(f"{r}/b{bins}", f): t for (r, f), t in more.items()})
        if args.tables:
            torch.save({"images": [str(p) for p, _, _, _ in items],
                        "ious": {f"{r}|{f}": t.ious for (r, f), t in tables.items()}}, args.tables)

    per_group: dict[str, dict[str, float]] = {g: {} for g in names}

    def score(key: tuple[str, str], j: int, rows: torch.Tensor) -> float:
        return float(tables[key].ious[rows, j].nan_to_num(0.0).mean())

    def capped(rows: torch.Tensor) -> torch.Tensor:
        """At most --choose-per-group evenly spaced rows of each group among ``rows``."""
        if not args.choose_per_group:
            return rows
        keep = []
        for g in names:
            mine = rows[torch.isin(rows, gidx[g])]
            if len(mine) > args.choose_per_group:
                mine = mine[torch.linspace(0, len(mine) - 1, args.choose_per_group).round().long()]
            keep.append(mine)
        return torch.cat(keep)

    val_rows = torch.nonzero(in_val).flatten()
    vkey, vj = choose(tables, capped(val_rows))
    for g in names:
        per_group[g]["chosen on validation"] = score(vkey, vj, gidx[g])
        others = capped(torch.cat([gidx[h] for h in names if h != g]))
        k, j = choose(tables, others)
        per_group[g]["chosen on the other groups"] = score(k, j, gidx[g])
        per_group[g]["choice left out"] = f"{k[0]} + {k[1]}, t={GRID[j]}"  # type: ignore[assignment]
        k, j = choose(tables, gidx[g])
        per_group[g]["best for this group alone"] = score(k, j, gidx[g])
    print(f"\nchosen on validation ({', '.join(sorted({groups[i] for i in val_rows.tolist()}))}): "
          f"{vkey[0]} + {vkey[1]}, t={GRID[vj]} (in-sample {score(vkey, vj, val_rows):.3f}); the run's own "
          f"choice: {cfg.consensus.threshold_source}")
    cols = ["chosen on validation", "chosen on the other groups", "best for this group alone"]
    print(f"\n{'group':10s} {'images':>6s} " + " ".join(f"{c:>26s}" for c in cols) + "   choice left out")
    for g in names:
        mark = "" if g in unseen else " (val)"
        print(f"{(g + mark):10s} {len(gidx[g]):6d} " + " ".join(f"{per_group[g][c]:26.3f}" for c in cols)
              + f"   {per_group[g]['choice left out']}")
    rows_unseen = torch.cat([gidx[g] for g in unseen])
    summary = {}
    for c in cols:  # mean over images of the groups never seen, as evaluate averages
        total = sum(per_group[g][c] * len(gidx[g]) for g in unseen)
        summary[c] = total / len(rows_unseen)
    print(f"{'unseen':10s} {len(rows_unseen):6d} " + " ".join(f"{summary[c]:26.3f}" for c in cols))
    print(json.dumps({"images": len(items), "groups": names, "unseen": unseen,
                      "validation_choice": {"recipe": vkey[0], "fusion": vkey[1], "threshold": GRID[vj]},
                      "unseen_mean_iou": summary, "per_group": per_group}))


if __name__ == "__main__":
    main()
