"""Quality benchmark on the real sets in ../shared/data, side by side with the paper and the trivial prior.

    python bench/quality.py [--runs-dir runs/quality] [--out DIR] [--epochs 8] [--image-size 224]
    python bench/quality.py --quick        # tiny subsets, 1 epoch, 64 px: a smoke test of the whole path

For each trainable set it trains the default offline ensemble with a fixed seed (or reuses RUNS_DIR/<set>
when it is there), evaluates it with ``pixelvote.evaluate.run.evaluate_run`` on the run's validation split
(images the models never trained on) and writes REPORT_DIR/<set>/{metrics.json,report.html}:

- busi: ``normal`` vs ``lesion`` (benign and malignant merged through a CSV manifest in a temp folder);
- fire: ``no_fire`` vs ``fire``, split by video (group pattern ``^(Video\\d+)``), so frames of one video
  never sit on both sides; the frames are kept out of training (``train_exclude``) and the augmentation is
  ``robust``, as the README trains fire;
- tbx11k_tb: TB images only, so nothing can be trained on it: the table shows the centred-box prior under
  the box protocol, and ``--tbx11k-run RUN`` evaluates a binary chest X-ray run of yours on it.

IoU is foreground-only on validation images whose truth has the object (mean over images); the paper's
IoU protocol is not stated, so the comparison with its figures is loose (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.models.registry import DEFAULT_PRESET  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PAPER = {"fire": (0.964, 0.647), "tbx11k": (0.9304, 0.3607)}
SETS: dict[str, dict[str, Any]] = {
    "busi": {"background": "normal", "group_pattern": None,
             "merge": {"benign": "lesion", "malignant": "lesion"}},
    # as the README trains fire: the video frames (only fire has them) kept out of training, so that the
    # classifiers learn fire rather than the source, and the augmentation against source shortcuts
    "fire": {"background": "no_fire", "group_pattern": r"^(Video\d+)", "merge": {},
             "train": {"train_exclude": r"^Video", "augment": "robust"}},
}


def write_manifest(name: str, folder: Path, quick: int, seed: int) -> Path:
    """A CSV ``path,label,mask,group`` (absolute paths) for the set, classes merged; with ``quick`` at most
    that many images per class, drawn round-robin over groups (those with masks first) so a group split
    is still possible and some validation images have masks."""
    from pixelvote.data.dataset import load_dataset

    spec = SETS[name]
    ds = load_dataset(DATA / name, group_pattern=spec["group_pattern"])
    by_class: dict[str, list[Any]] = defaultdict(list)
    for s in ds.samples:
        by_class[spec["merge"].get(s.label, s.label)].append(s)
    rng = random.Random(seed)
    rows = []
    for label, samples in sorted(by_class.items()):
        if quick:
            groups: dict[str, list[Any]] = defaultdict(list)
            for s in samples:
                groups[s.group].append(s)
            queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
            rng.shuffle(queues)
            queues.sort(key=lambda q: not any(s.mask for s in q))  # groups with masks first: IoU needs them
            picked: list[Any] = []
            while len(picked) < quick and any(queues):
                for q in queues:
                    if q and len(picked) < quick:
                        picked.append(q.pop())
            samples = picked
        rows += [[str(s.path.resolve()), label, str(s.mask.resolve()) if s.mask else "", s.group]
                 for s in samples]
    path = folder / name / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["path", "label", "mask", "group"], *rows])
    return path


def ensure_run(name: str, data: Path, runs: Path, args: argparse.Namespace) -> tuple[Path, bool]:
    """The run for ``name``: reused when RUNS_DIR/<name> is complete, resumed when partial, else trained."""
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    run = runs / name
    if (run / "run.json").exists() and (run / "calibration.json").exists():
        return run, True
    # --quick's few images per class may all be frames: nothing of fire would be left to train on
    options = {} if args.quick else SETS[name].get("train", {})
    cfg = TrainConfig(data=data, out=run, preset=args.preset, epochs=args.epochs, image_size=args.image_size,
                      seed=args.seed, mc_samples=args.mc_samples, background=SETS[name]["background"],
                      group_pattern=SETS[name]["group_pattern"], batch_size=args.batch_size, **options)
    return train(cfg, resume=(run / "train_config.json").exists()), False


def tbx11k_prior(limit: int) -> dict[str, Any]:
    """Centred-box prior against the filled union of the TB boxes (box protocol), no model needed."""
    from pixelvote.data import tbx11k
    from pixelvote.evaluate.metrics import PixelStats, centred_box_prior

    stats = PixelStats()
    samples = tbx11k.list_samples(DATA / "tbx11k_tb")
    for s in samples[:limit] if limit else samples:
        truth = tbx11k.sample_mask(s)
        if truth.any():
            stats.update(centred_box_prior(s.size), truth)
    return stats.compute()


def summarise(name: str, m: dict[str, Any], seconds: float, reused: bool) -> dict[str, Any]:
    ens = (m.get("classification") or {}).get("ensemble") or {}
    px = m.get("pixel") or {}
    members = px.get("members") or {}
    best: tuple[str | None, dict[str, Any]] = max(
        members.items(), key=lambda kv: kv[1].get("mean_iou") or -1.0, default=(None, {}))
    return {"set": name, "images": m["n_images"], "accuracy": ens.get("accuracy"),
            "balanced_accuracy": ens.get("balanced_accuracy"), "auroc": ens.get("auroc"),
            "iou_images": (px.get("consensus") or {}).get("images"),
            "consensus_iou": (px.get("consensus") or {}).get("mean_iou"),
            "pooled_iou": (px.get("consensus") or {}).get("pooled_iou"),
            "best_member": best[0], "best_member_iou": best[1].get("mean_iou"),
            "prior_iou": (px.get("prior") or {}).get("mean_iou"),
            "ece": (m.get("calibration") or {}).get("ece"),
            "flag_rate": (m.get("flags") or {}).get("flag_rate"),
            "errors_caught": (m.get("flags") or {}).get("errors_caught"), "seconds": round(seconds, 1),
            "reused_run": reused, "warnings": m.get("warnings") or []}


def _pct(x: Any) -> str:
    return "—" if not isinstance(x, int | float) else f"{100 * x:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["set", "images", "acc %", "bal. acc %", "AUROC", "IoU imgs", "consensus mIoU %", "pooled IoU %",
            "best member mIoU %", "prior mIoU %", "paper acc %", "paper IoU %"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        paper = PAPER.get(r["set"].split("_")[0], (None, None))
        auroc = "—" if r.get("auroc") is None else f"{r['auroc']:.3f}"
        best = "—" if r.get("best_member") is None else f"{_pct(r['best_member_iou'])} ({r['best_member']})"
        cells = [r["set"], str(r.get("images", "—")), _pct(r.get("accuracy")),
                 _pct(r.get("balanced_accuracy")), auroc, str(r.get("iou_images") or "—"),
                 _pct(r.get("consensus_iou")), _pct(r.get("pooled_iou")), best, _pct(r.get("prior_iou")),
                 _pct(paper[0]), _pct(paper[1])]
        print("| " + " | ".join(cells) + " |")
    print("\nIoU: foreground-only, mean over validation images whose truth has the object, at the original "
          "image size. Prior: a centred box of half the width and height. The paper states no IoU protocol.")
    for r in rows:
        for w in r.get("warnings", []):
            print(f"warning ({r['set']}): {w}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="runs are trained here, and reused when present (default runs/quality[-quick])")
    ap.add_argument("--out", type=Path, default=None, help="reports (default RUNS_DIR/reports)")
    ap.add_argument("--sets", default="busi,fire,tbx11k_tb")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mc-samples", type=int, default=30)
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny subsets, 1 epoch, 64 px, T=4: a smoke test")
    ap.add_argument("--quick-per-class", type=int, default=10)
    ap.add_argument("--tbx11k-run", type=Path, default=None,
                    help="a binary chest X-ray run to score on tbx11k_tb (box protocol)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.image_size, args.mc_samples, args.batch_size = 1, 64, 4, 8
    suffix = "-quick" if args.quick else ""
    runs = args.runs_dir or ROOT / "runs" / f"quality{suffix}"
    out = args.out or runs / "reports"
    from pixelvote.evaluate.run import evaluate_run

    rows = []
    with tempfile.TemporaryDirectory(prefix="pixelvote-quality-") as tmp:
        for name in args.sets.split(","):
            t0 = time.time()
            if name == "tbx11k_tb":
                if args.tbx11k_run is None:
                    prior = tbx11k_prior(args.quick_per_class if args.quick else 0)
                    rows.append({"set": name, "images": prior["images"], "iou_images": prior["images"],
                                 "prior_iou": prior["mean_iou"], "seconds": round(time.time() - t0, 1),
                                 "warnings": ["TB images only: no classifier can be trained on this set; "
                                              "pass --tbx11k-run RUN to score a chest X-ray run."]})
                    continue
                m = evaluate_run(args.tbx11k_run, DATA / name, out / name, split="all", dataset="tbx11k",
                                 mc_samples=args.mc_samples)
                rows.append(summarise(name, m, time.time() - t0, True))
                continue
            if name not in SETS:
                raise SystemExit(f"unknown set {name!r}: expected one of {', '.join([*SETS, 'tbx11k_tb'])}")
            plain = name == "fire" and not args.quick  # fire's folder layout already has the right classes
            per_class = args.quick_per_class if args.quick else 0
            data = DATA / name if plain else write_manifest(name, Path(tmp), per_class, args.seed)
            run, reused = ensure_run(name, data, runs, args)
            # split="val": the run's validation list, matched by path, also when the manifest is rewritten
            m = evaluate_run(run, data, out / name, split="val", dataset=name, mc_samples=args.mc_samples)
            rows.append(summarise(name, m, time.time() - t0, reused))
            print(f"{name}: report in {out / name / 'report.html'} ({rows[-1]['seconds']} s)", flush=True)
    print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
