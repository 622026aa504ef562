"""How well could a model trained on the TRUE masks do on groups (videos, patients) it never saw?

    python bench/supervised_ceiling.py --data ../shared/data/fire --background no_fire \
        --group-pattern '^(Video\\d+)' \
        --folds 'Video02,Video03,Video04;Video05,Video06,Video07,Video08' \
        [--image-size 224] [--epochs 20] [--augment] [--seed 0] [--no-crf] [--no-pretrained]

A yardstick for weak supervision, not a way to annotate: for each fold (a ';'-separated list of held-out
groups) pixelvote's segmenter (`segment train`'s network and loss, encoder from ImageNet) is trained on the
ground-truth masks of every masked image of the other groups, with every background-class image as an
all-background negative, then scored on the masked images of the fold's groups, at their own size, at several
thresholds and after pixelvote's default dense CRF. Beside it a colour histogram (``--colour-bins`` per
channel) counted on the same training masks, its threshold chosen on them. Images of a finding without a
mask are not used (they have no target). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.data.dataset import Sample, load_dataset, resolve_background  # noqa: E402
from pixelvote.data.imageio import read_image, read_mask  # noqa: E402
from pixelvote.data.transforms import fit_image, to_tensor  # noqa: E402
from pixelvote.errors import PixelvoteError  # noqa: E402
from pixelvote.evaluate.metrics import mask_iou  # noqa: E402
from pixelvote.refine.colour import colour_bins  # noqa: E402
from pixelvote.segment.data import SegDataset, SegExample  # noqa: E402
from pixelvote.segment.train import SegConfig, _fit, predict  # noqa: E402

THRESHOLDS = (0.3, 0.5, 0.7)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(mask_iou(pred, truth))


def colour_index(image: np.ndarray, bins: int) -> np.ndarray:
    """An ``(H, W, 3)`` image's colour bins as the run's colour prior numbers them."""
    return colour_bins(to_tensor(image)[None], bins)[0].numpy()


class ColourHistogram:
    """P(mask | colour) counted on training images and their true masks; threshold chosen on them. Unlike
    the run's prior (:func:`pixelvote.refine.colour.learn_colour_prior`, which has only the ensemble's maps
    and so counts no pixel of a finding image as background), every pixel here is labelled, so the
    histogram counts them all."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.fg = np.zeros(bins ** 3)
        self.all = np.zeros(bins ** 3)
        self.threshold = 0.5

    def add(self, image: np.ndarray, mask: np.ndarray | None) -> None:
        idx = colour_index(image, self.bins)
        self.all += np.bincount(idx.ravel(), minlength=self.bins ** 3)
        if mask is not None:
            self.fg += np.bincount(idx[mask], minlength=self.bins ** 3)

    def prob(self, image: np.ndarray) -> np.ndarray:
        p = (self.fg + 0.5) / (self.all + 1.0)
        return p[colour_index(image, self.bins)]

    def choose(self, pairs: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> None:
        probs = [self.prob(im) for im, _ in pairs]
        scores = [np.mean([iou(p > t, m) for p, (_, m) in zip(probs, pairs, strict=True)]) for t in grid]
        self.threshold = float(grid[int(np.argmax(scores))])


def train_fold(train: list[Sample], background: str, args: argparse.Namespace) -> torch.nn.Module:
    examples = [SegExample(s.path, s.mask if s.label != background else None, None, 1.0, True)
                for s in train]
    cfg = SegConfig(image_size=args.image_size, epochs=args.epochs, seed=args.seed, augment=args.augment)
    ds = SegDataset(examples, args.image_size, augment=args.augment)
    model = _fit(ds, cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.pretrained, [])
    model.eval()
    model.input_size = args.image_size
    return model


def score_fold(model: torch.nn.Module, hist: ColourHistogram, test: list[Sample],
               args: argparse.Namespace) -> dict[str, list[float]]:
    from pixelvote.refine.crf import CRFConfig, dense_crf

    rows: dict[str, list[float]] = {}
    for s in test:
        img = read_image(s.path)
        hw = img.shape[:2]
        truth = read_mask(s.mask, (hw[1], hw[0]))
        x = fit_image(to_tensor(img), args.image_size, "squash")[None]
        prob = predict(model, x)
        full = F.interpolate(prob[:, None], size=hw, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        for t in THRESHOLDS:
            rows.setdefault(f"segmenter > {t}", []).append(iou(full > t, truth))
        if args.crf:
            q = dense_crf(prob.cpu(), x, CRFConfig())
            q = F.interpolate(q[:, None], size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()
            rows.setdefault("segmenter + dense CRF", []).append(iou(q > 0.5, truth))
        colour = hist.prob(img) > hist.threshold
        rows.setdefault(f"colour histogram ({hist.bins} bins)", []).append(iou(colour, truth))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--background", default=None)
    ap.add_argument("--group-pattern", required=True)
    ap.add_argument("--folds", required=True, help="held-out groups, per fold: 'A,B;C,D'")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--augment", action="store_true", help="segment train --augment's crops and jitter")
    ap.add_argument("--no-crf", dest="crf", action="store_false")
    ap.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    ap.add_argument("--colour-bins", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        SegConfig(image_size=args.image_size, epochs=args.epochs)
    except ValidationError as exc:
        sys.exit(f"--image-size / --epochs: {exc.errors()[0]['msg']}")
    if args.colour_bins not in (2, 4, 8, 16, 32, 64):
        sys.exit(f"--colour-bins {args.colour_bins}: a power of two from 2 to 64 (bins must divide 256)")
    try:
        ds = load_dataset(args.data, group_pattern=args.group_pattern)
        background = resolve_background(ds.classes, args.background)
    except PixelvoteError as exc:
        sys.exit(str(exc))
    if args.crf:
        from pixelvote.refine import crf

        if not crf.available():
            sys.exit(f"the dense CRF needs pydensecrf2 ({crf.INSTALL_HINT}); or pass --no-crf")
    samples = [*ds.samples, *ds.val, *ds.test]
    folds = [[g for g in f.split(",") if g] for f in args.folds.split(";")]
    groups = {s.group for s in samples}
    unknown = sorted({g for f in folds for g in f} - groups)
    if unknown:
        sys.exit(f"--folds names groups the data does not have: {unknown} (groups: {sorted(groups)[:20]})")
    torch.manual_seed(args.seed)
    per_group: dict[str, dict[str, list[float]]] = {}
    timing = []
    for k, held in enumerate(folds):
        test = [s for s in samples if s.group in held and s.mask is not None]
        train = [s for s in samples if s.group not in held and (s.mask is not None or s.label == background)]
        if not test or not any(s.mask is not None for s in train):
            sys.exit(f"fold {k + 1} ({','.join(held)}): needs masked images both held out and left to "
                     "train on")
        t0 = time.time()
        model = train_fold(train, background, args)
        hist = ColourHistogram(args.colour_bins)
        pairs = []
        for s in train:
            img = read_image(s.path)
            m = read_mask(s.mask, (img.shape[1], img.shape[0])) if s.mask is not None else None
            hist.add(img, m)
            if m is not None:
                pairs.append((img, m))
        hist.choose(pairs, np.linspace(0.05, 0.95, 19))
        timing.append(round(time.time() - t0, 1))
        print(f"fold {k + 1}: trained on {len(train)} images of the other groups in {timing[-1]} s; "
              f"scoring {len(test)} held-out images", file=sys.stderr, flush=True)
        for g in held:
            rows = score_fold(model, hist, [s for s in test if s.group == g], args)
            if rows:
                per_group[g] = rows

    names = list(next(iter(per_group.values())))
    overall = {n: float(np.mean([v for g in per_group for v in per_group[g][n]])) for n in names}
    images = sum(len(next(iter(r.values()))) for r in per_group.values())
    print(f"\nmean IoU on {images} held-out images ({len(per_group)} groups), trained on the true masks of "
          "the other groups")
    print("| masks | all held out | " + " | ".join(sorted(per_group)) + " |")
    print("|---|---|" + "---|" * len(per_group))
    for n in names:
        cells = " | ".join(f"{np.mean(per_group[g][n]):.3f}" for g in sorted(per_group))
        print(f"| {n} | **{overall[n]:.3f}** | {cells} |")
    print(json.dumps({"images": images, "image_size": args.image_size, "epochs": args.epochs,
                      "augment": args.augment, "seconds_per_fold": timing, "mean_iou": overall,
                      "per_group": {g: {n: float(np.mean(v)) for n, v in r.items()}
                                    for g, r in per_group.items()}}))


if __name__ == "__main__":
    main()
