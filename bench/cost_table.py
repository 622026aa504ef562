"""The timings behind calibration's cost table (``pixelvote.evaluate.selection``), measured on this machine.

    python bench/cost_table.py [--repeats 9] [--batch 8] [--models A,B] [--sizes 128,160] [--iterations 5,15]

1. Each registered backbone's plain forward pass (as ``bench/speed.py``'s floor: ``inference_mode``,
   channels_last, batch ``--batch`` at 224 px, random weights), ms per image: what ``FORWARD_MS`` holds,
   so that a run's extra steps are priced against its own members rather than one reference ensemble.
2. The dense CRF as ``annotate`` runs it (a batch of real fire frames, its worker processes), ms per image
   at sizes 128-224 px and 1-15 mean-field iterations, and the least-squares fit
   ``ms = fixed + pixels * (per_pixel + per_pixel_iteration * iterations)`` (pixels in units of 128 x 128)
   that ``CRF_MS`` holds, beside the table's own prediction for each cell.
3. The guided filter, the colour prior and the tone map on the same batch: ``GUIDED_MS``, ``COLOUR_MS``,
   ``TONE_MS``.

The fastest of ``--repeats`` rounds after a warm-up, each round timing every figure once, so that the
machine's drift between minutes (tens of percent on a shared one) hits them alike: only their ratios enter
the table. Run it on a quiet machine: two-thread convolutions slow down more than the CRF's single-threaded
workers when other work shares the cores, which would price the CRF too cheaply.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.data.imageio import read_image  # noqa: E402
from pixelvote.data.transforms import resize_image, to_tensor  # noqa: E402
from pixelvote.evaluate import selection  # noqa: E402
from pixelvote.models.ensemble import Ensemble  # noqa: E402
from pixelvote.models.member import build_member  # noqa: E402
from pixelvote.models.registry import get_spec, list_models  # noqa: E402
from pixelvote.refine import crf  # noqa: E402
from pixelvote.refine.colour import ColourPrior, with_colour  # noqa: E402
from pixelvote.refine.guided import grey, guided_filter  # noqa: E402
from pixelvote.refine.tone import with_tone  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SIZES = (128, 160, 192, 224)
ITERATIONS = (1, 5, 10, 15)


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, per: int) -> dict[str, float]:
    """The fastest round's ms per image of each function (what the step costs when the machine is not slowed
    by others), the rounds interleaved so that the machine's drift between minutes hits every figure alike
    (only their ratios enter the cost table)."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc="rounds", leave=False):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3 / per)
    return {k: min(v) for k, v in times.items()}


def frames(n: int, size: int) -> torch.Tensor:
    paths = sorted((DATA / "fire" / "images").glob("*/Video*"))[::7][:n]
    if len(paths) < n:
        raise SystemExit(f"need {n} fire frames under {DATA}/fire/images")
    return torch.stack([resize_image(to_tensor(read_image(p)), size) for p in paths])


def blob_maps(n: int, size: int) -> torch.Tensor:
    """Soft maps like a CAM's: a smooth blob per image, off centre."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.exp(-((xx - 0.2 * (i % 3 - 1)) ** 2 + (yy - 0.1 * (i % 2)) ** 2) / 0.1)
                        for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models", help="backbones to time, comma-separated (default: every registered one but "
                                     "the test models)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="CRF sizes, px")
    ap.add_argument("--iterations", default=",".join(map(str, ITERATIONS)), help="CRF mean-field iterations")
    args = ap.parse_args()
    if not crf.available():
        raise SystemExit(f"the dense CRF is not installed: {crf.INSTALL_HINT}")
    names = (args.models.split(",") if args.models
             else [n for n in list_models() if get_spec(n).source != "test"])
    sizes = [int(v) for v in args.sizes.split(",")]
    counts = [int(v) for v in args.iterations.split(",")]
    torch.manual_seed(0)
    B = args.batch
    out: dict = {"threads": torch.get_num_threads(), "batch": B}

    x = torch.rand(B, 3, 224, 224)
    # the analysed images as the consensus gets them (Analysis.inputs): floats in [0, 1], channels_last
    imgs = frames(B, 224).float().div_(255).contiguous(memory_format=torch.channels_last)
    soft = blob_maps(B, 224)
    fns: dict[str, Callable[[], object]] = {}
    for name in names:
        # as bench/speed.py's floor: the member in an Ensemble (channels_last), its input normalised
        ens = Ensemble([build_member(name, 2, pretrained=False).eval()], ("finding", "background"),
                       "background", 224).to("cpu").eval()

        def run(ens: Ensemble = ens) -> None:
            with torch.inference_mode():
                ens.members[0](ens.normalize(x))

        fns[name] = run
    for size in sizes:
        for n in counts:
            cfg = crf.CRFConfig(size=size, iterations=n, bilateral_compat=30.0)
            fns[f"crf {size}x{n}"] = lambda cfg=cfg: crf.dense_crf(soft, imgs, cfg, 0.3)
    prior = ColourPrior(bins=8, probability=[0.5] * 512, images=1, findings=1)
    fns["colour"] = lambda: with_colour(soft, imgs, prior, 0.75)
    fns["tone"] = lambda: with_tone(soft, imgs, "dark", 0.5)
    maps = soft.expand(3, -1, -1, -1).contiguous()  # one map per member of a three-member ensemble
    radius = max(1, round(0.04 * 224))  # MapConfig's defaults
    fns["guided"] = lambda: guided_filter(maps, grey(imgs), radius, 0.01)
    ms = interleaved_ms(fns, args.repeats, B)

    forward = {n: ms[n] for n in names}
    for name, v in forward.items():
        print(f"forward {name:26s} {v:7.1f} ms/image   (table: "
              f"{selection.FORWARD_MS.get(name, float('nan')):.1f})")
    out["forward_ms"] = forward

    cells = {(size, n): ms[f"crf {size}x{n}"] for size in sizes for n in counts}
    pixels = np.array([(min(s, 224) / 128) ** 2 for s, _ in cells])
    iters = np.array([n for _, n in cells], dtype=float)
    design = np.stack([np.ones_like(pixels), pixels, pixels * iters], 1)
    fit, *_ = np.linalg.lstsq(design, np.array(list(cells.values())), rcond=None)
    print(f"\nthe dense CRF, ms per image ({crf.worker_count(B)} workers, batch {B}); "
          f"fit: {fit[0]:.2f} + px * ({fit[1]:.2f} + {fit[2]:.3f} * iterations), px = (size/128)^2")
    print(f"{'size':>5s} {'iter':>5s} {'measured':>9s} {'fit':>7s} {'table':>7s}")
    for (size, n), v in cells.items():
        px = (min(size, 224) / 128) ** 2  # the CRF never runs larger than the maps
        print(f"{size:5d} {n:5d} {v:9.1f} {fit[0] + px * (fit[1] + fit[2] * n):7.1f} "
              f"{selection.crf_ms(n, size):7.1f}")
    out["crf_ms"] = {f"{s}x{n}": v for (s, n), v in cells.items()}
    out["crf_fit"] = [float(v) for v in fit]
    out["colour_ms"], out["guided_ms"], out["tone_ms"] = ms["colour"], ms["guided"], ms["tone"]
    print(f"\ncolour prior {out['colour_ms']:.2f} ms/image (table {selection.COLOUR_MS}); tone map "
          f"{out['tone_ms']:.2f} ms/image (table {selection.TONE_MS}); guided filter "
          f"{out['guided_ms']:.1f} ms/image (table {selection.GUIDED_MS})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
