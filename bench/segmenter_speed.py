"""How much faster a stage-two segmenter makes a mask than the ensemble path it replaces.

    python bench/segmenter_speed.py --run RUN --segmenter SEG [--images 32] [--batch 8] [--repeats 5]

On the same batches of the run's validation images, in one process, interleaved and after a warm-up, it
times per image (median over repeats):

1. ensemble   the mask as ``annotate`` makes it without a segmenter: ``analyze`` with the run's map recipe and
              T MC samples + ``apply_consensus`` with the run's consensus (its CRF included), with the models
              as ``annotate`` loads them (batch norms folded);
2. plain      the same with the plain maps and the paper's consensus (no CRF): the cheapest ensemble mask;
3. segmenter  the segmenter's probability, refined by its dense CRF at its ``crf_threshold``, iterations
              and cutoff where its calibration kept the CRF (``refines``), as ``annotate --segmenter``
              makes the mask (without the ensemble, which ``annotate --segmenter`` still runs for the
              diagnosis, uncertainty and flags);
4. segmenter, CRF in one process: the same with ``crf.workers(1)``, the baseline for the CRF's worker
              processes (the ensemble paths use them too).

It prints the table and, as its last line, one JSON object with the ratios ``ensemble_over_segmenter``,
``plain_over_segmenter`` and ``one_process_over_workers``. Target (issue "Stage two", printed, not
asserted): the segmenter >= 3x faster than the ensemble path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.consensus import ConsensusConfig, apply_consensus  # noqa: E402
from pixelvote.data.imageio import read_image  # noqa: E402
from pixelvote.data.transforms import fit_image, to_tensor  # noqa: E402
from pixelvote.explain.analyze import MapConfig, analyze  # noqa: E402
from pixelvote.models.checkpoint import load_run  # noqa: E402
from pixelvote.refine.crf import workers  # noqa: E402
from pixelvote.segment.train import load_segmenter, predict, refined_margin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path, required=True)
    ap.add_argument("--images", type=int, default=32, help="validation images timed (first N of split.json)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ens, cfg = load_run(args.run, fold=True)  # as annotate loads it
    model, scfg = load_segmenter(args.segmenter)
    paths = json.loads((args.run / "split.json").read_text())["val"][: args.images]
    x = torch.stack([fit_image(to_tensor(read_image(p)), ens.image_size, ens.resize) for p in paths])
    batches = list(x.split(args.batch))
    T = cfg.mc_samples
    paper = ConsensusConfig()

    def ensemble(b: torch.Tensor) -> None:
        apply_consensus(analyze(ens, b, mc_samples=T, maps=cfg.maps), cfg.consensus, ens.background_index)

    def plain(b: torch.Tensor) -> None:
        apply_consensus(analyze(ens, b, mc_samples=T, maps=MapConfig()), paper, ens.background_index)

    def segmenter(b: torch.Tensor) -> None:
        prob = predict(model, b)
        if scfg.refines:
            refined_margin(prob, b, scfg, cfg.consensus.crf)

    def segmenter_one_process(b: torch.Tensor) -> None:
        with workers(1):
            segmenter(b)

    paths_timed = {"ensemble": ensemble, "plain": plain, "segmenter": segmenter,
                   "segmenter_one_process": segmenter_one_process}
    for fn in paths_timed.values():  # warm-up
        fn(batches[0])
    times: dict[str, list[float]] = {k: [] for k in paths_timed}
    for _ in range(args.repeats):
        for name, fn in paths_timed.items():  # interleaved, so drift hits all three alike
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            times[name].append((time.perf_counter() - t0) / len(x))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"{args.run.name}: {len(x)} validation images at {ens.image_size} px, batch {args.batch}, T={T}, "
          f"{torch.get_num_threads()} threads; run's recipe: {cfg.consensus.threshold_source}")
    print(f"{'path':70s} {'ms/image':>9s}")
    print(f"{'ensemble: the run recipe (maps + consensus, as annotate)':70s} {ms['ensemble']:9.1f}")
    print(f"{'ensemble: plain maps, paper consensus':70s} {ms['plain']:9.1f}")
    crf = (f" + dense CRF at {scfg.crf_threshold}, {scfg.crf_settings(cfg.consensus.crf).iterations} "
           "iterations" if scfg.refines else "")
    print(f"{'segmenter' + crf:70s} {ms['segmenter']:9.1f}")
    print(f"{'segmenter' + crf + ' in one process':70s} {ms['segmenter_one_process']:9.1f}")
    ratios = {"ensemble_over_segmenter": ms["ensemble"] / ms["segmenter"],
              "plain_over_segmenter": ms["plain"] / ms["segmenter"],
              "one_process_over_workers": ms["segmenter_one_process"] / ms["segmenter"]}
    print(f"segmenter is {ratios['ensemble_over_segmenter']:.2f}x faster than the run's ensemble path and "
          f"{ratios['plain_over_segmenter']:.2f}x faster than the plain one (target: >= 3x); its CRF's "
          f"worker processes make it {ratios['one_process_over_workers']:.2f}x faster than one process")
    print(json.dumps({"ms_per_image": ms, **ratios}))


if __name__ == "__main__":
    main()
