"""Calibrate a trained run on some of the groups (videos) it kept out of training, score it on the others.

    python bench/video_folds.py --run runs/fire-robust \
        --folds 'Video02,Video03,Video04;Video05,Video06,Video07,Video08' \
        [--out DIR] [--per-group 10] [--labels] [--set tone_weights=[] ...]

`train --train-exclude` keeps a source out of training; `train` (--calibrate-excluded, the default) then
chooses the masks on the validation split's masks and on those of the kept-out images, a few per group. This
measures what that is worth on groups calibration never saw: for each fold (a ';'-separated list of groups)
the run's members are copied, calibrated as `train` calibrates them (its own settings, with the validation
split and the fold's kept-out groups), and evaluated as `evaluate --split excluded` scores them on the
kept-out images of every other group (two folds that split the groups score each group once). The last line
is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.data.dataset import load_dataset  # noqa: E402
from pixelvote.errors import ConfigError  # noqa: E402
from pixelvote.evaluate.run import evaluate_run  # noqa: E402
from pixelvote.models.checkpoint import read_run_config, save_run_config  # noqa: E402
from pixelvote.train.cache import cache_samples  # noqa: E402
from pixelvote.train.calibrate import calibrate  # noqa: E402
from pixelvote.train.config import TrainConfig  # noqa: E402
from pixelvote.train.loop import calibration_samples  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--folds", required=True, help="groups calibrated on, per fold: 'A,B;C,D'")
    ap.add_argument("--out", type=Path, default=None, help="where the fold runs go (default: beside --run)")
    ap.add_argument("--per-group", type=int, default=None, help="train --calibration-per-group (default: "
                    "the run's own setting, else the default)")
    ap.add_argument("--labels", action="store_true", help="score masks as annotate --labels makes them")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override one of the run's train settings for calibration, e.g. tone_weights=[] "
                    "(no tone prior) or crf_bases=8 (the CRF on every fusion); repeatable")
    args = ap.parse_args(argv)

    cfg = TrainConfig.model_validate_json((args.run / "train_config.json").read_text())
    update: dict = {"calibrate_excluded": True}
    if args.per_group is not None:
        update["calibration_per_group"] = args.per_group
    for item in args.set:
        field, eq, value = item.partition("=")
        if not eq or field not in TrainConfig.model_fields:
            sys.exit(f"--set {item}: expected FIELD=JSON with a TrainConfig field, e.g. tone_weights=[]")
        try:
            update[field] = json.loads(value)
        except json.JSONDecodeError as e:
            sys.exit(f"--set {item}: {value!r} is not JSON ({e}); e.g. crf_bases=8 or tone_weights=[0.3]")
    try:
        cfg = TrainConfig.model_validate({**cfg.model_dump(), **update})  # validated, unlike model_copy
    except (ValidationError, ConfigError) as e:
        sys.exit(f"--set: {e}")
    if not cfg.group_pattern:
        sys.exit(f"{args.run}: trained without --group-pattern: there are no groups to fold over")
    split = json.loads((args.run / "split.json").read_text())
    ds = load_dataset(cfg.data, group_pattern=cfg.group_pattern)
    by_path = {str(s.path.resolve()): s for s in [*ds.samples, *ds.val, *ds.test]}
    pick = lambda key: [by_path[p] for p in split.get(key, []) if p in by_path]  # noqa: E731
    val_s, train_s, kept_s = pick("val"), pick("train"), pick("excluded_from_training")
    groups = sorted({s.group for s in kept_s if s.mask is not None})
    folds = [[g.strip() for g in f.split(",") if g.strip()] for f in args.folds.split(";")]
    unknown = sorted({g for f in folds for g in f} - set(groups))
    if unknown:
        sys.exit(f"unknown group(s) {unknown}; the kept-out groups with masks are {groups}")
    classes = read_run_config(args.run).classes
    val = cache_samples(val_s, classes, cfg.image_size, desc="validation images", resize=cfg.resize,
                        full_masks=True)
    train = cache_samples(train_s, classes, cfg.image_size, desc="training images", with_masks=False,
                          resize=cfg.resize)
    out_root = args.out or args.run.parent
    results = []
    for i, fold in enumerate(folds):
        run = out_root / f"{args.run.name}-fold{i + 1}"
        if not (run / "fold.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("calibration.json", "fold.json"))
            chosen = calibration_samples(val.samples, [s for s in kept_s if s.group in fold], cfg)
            masks = cache_samples(chosen, classes, cfg.image_size, desc="calibration masks",
                                  resize=cfg.resize, full_masks=True)
            cal = calibrate(run, val, cfg, train, masks)
            run_cfg = read_run_config(run)
            run_cfg.consensus, run_cfg.maps = cal.consensus, cal.maps
            run_cfg.decision_threshold = cal.decision_threshold
            run_cfg.decision_evidence = cal.decision_evidence
            run_cfg.best, run_cfg.labelled = cal.recipes.get("best"), cal.recipes.get("labelled")
            save_run_config(run, run_cfg)
            # every image of the fold's groups counts as seen: evaluate scores the other groups only
            seen = [str(s.path.resolve()) for s in [*chosen, *(s for s in kept_s if s.group in fold)]]
            (run / "split.json").write_text(json.dumps({**split, "calibration_masks": sorted(set(seen))}))
            (run / "fold.json").write_text(json.dumps({"calibrated_on": fold,
                                                       "calibration_images": len(chosen)}))
        m = evaluate_run(run, cfg.data, run / ("eval-labels" if args.labels else "eval"), split="excluded",
                         labels=args.labels, max_gallery=0)
        per_group: dict[str, list[float]] = {}
        for row in m["per_image"]:
            g = next(s.group for s in kept_s if s.path.name == Path(row["image"]).name)
            if row["iou"] is not None:
                per_group.setdefault(g, []).append(row["iou"])
        cal_json = json.loads((run / "calibration.json").read_text())
        sel = cal_json.get("selection", {})
        results.append({"fold": i + 1, "calibrated_on": fold, "recipe": sel.get("recipe"),
                        "fusion": sel.get("fusion"), "threshold": sel.get("threshold"),
                        "calibration_iou": cal_json.get("val_mean_iou", float("nan")),
                        "scored_images": m["pixel"]["consensus"]["scored"],
                        "mean_iou": m["pixel"]["consensus"]["mean_iou"],
                        "per_group": {g: sum(v) / len(v) for g, v in sorted(per_group.items())}})
    print(f"\n{'fold':5s} {'calibrated on':40s} {'choice':70s} {'cal IoU':>8s} {'unseen IoU':>10s} "
          f"{'images':>6s}")
    for r in results:
        choice = f"{r['recipe']} + {r['fusion']}, t={r['threshold']}"
        print(f"{r['fold']:<5d} {','.join(r['calibrated_on'])[:40]:40s} {choice[:70]:70s} "
              f"{r['calibration_iou']:8.3f} {r['mean_iou']:10.3f} {r['scored_images']:6d}")
        print("      " + "  ".join(f"{g} {v:.3f}" for g, v in r["per_group"].items()))
    total = sum(r["mean_iou"] * r["scored_images"] for r in results)
    n = sum(r["scored_images"] for r in results)
    print(f"every kept-out group scored by a calibration that never saw it ({n} image-scores): "
          f"mean IoU {total / max(n, 1):.3f}")
    print(json.dumps({"folds": results, "mean_iou_unseen": total / max(n, 1)}))


if __name__ == "__main__":
    main()
