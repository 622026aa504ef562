"""Throughput of the Ray engine with 1 and 2 workers on this machine, and the memory of each worker.

    python bench/scale.py [--quick] [--workers 1,2] [--images 32] [--preset offline] [--image-size 224]
                          [-T 30] [--batch-size 8] [--cpus 2] [--no-local]

On real images (half BUSI, half fire, from ../shared/data) and a run folder of random weights (they cost the
same as trained ones; nothing is downloaded), it starts one local Ray instance with ``--cpus`` CPUs and runs
``annotate_ray`` once per worker count, each into a fresh output folder, then (for reference) the local
engine on the same images. For each it prints:

- ``wall img/s``: images / wall time of the whole call, including starting the workers and loading the models;
- ``steady img/s``: images per second between the first and the last manifest line (the driver's own view
  of a long run: start-up excluded), from polling annotations.jsonl;
- ``peak RSS/worker``: the highest VmHWM of the Ray worker processes that ran the annotator (MiB, Linux;
  it counts the shared-library pages every process maps, so it overstates what a second worker adds).

Each worker takes 1 CPU and 1 torch thread (``num_cpus_per_worker=1``); the local engine uses torch's
default thread count. On a small shared machine the figures are noisy: read them as an order of magnitude.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from speed import build_ensemble, copy_images, real_images, write_run  # noqa: E402


class Watch(threading.Thread):
    """Polls the manifest's line count and the annotator processes' peak RSS until stopped."""

    def __init__(self, manifest: Path, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.manifest, self.period = manifest, period
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None
        self.hwm_kib: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.perf_counter()
            n = self.manifest.read_bytes().count(b"\n") if self.manifest.exists() else 0
            if n and self.first is None:
                self.first = (now, n)
            if n and (self.last is None or n > self.last[1]):
                self.last = (now, n)
            self.hwm_kib.update(_annotator_hwm())
            time.sleep(self.period)

    def steady(self) -> float | None:
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def _annotator_hwm() -> dict[int, int]:
    """``{pid: VmHWM KiB}`` of the Ray worker processes running the annotator (their title names it)."""
    found: dict[int, int] = {}
    if not Path("/proc").is_dir():
        return found
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"_Annotator" not in (d / "cmdline").read_bytes():
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    found[int(d.name)] = int(line.split()[1])
        except OSError:
            continue
    return found


def timed(fn: Any, out: Path) -> dict[str, Any]:
    watch = Watch(out / "annotations.jsonl")
    watch.start()
    t0 = time.perf_counter()
    summary = fn()
    wall = time.perf_counter() - t0
    time.sleep(0.2)
    watch.stop.set()
    watch.join()
    n = summary.annotated
    hwm = [v / 1024.0 for v in watch.hwm_kib.values()]
    return {"images": n, "wall_s": round(wall, 2), "wall_img_s": round(n / wall, 3),
            "steady_img_s": None if watch.steady() is None else round(watch.steady(), 3),
            "workers_seen": len(hwm), "peak_rss_mib_per_worker": round(max(hwm), 1) if hwm else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--quick", action="store_true", help="offline @ 128 px, T=8, 8 images, batch 2 (about a minute)")
    add("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    add("--images", type=int, help="real images (default 32; quick: 8)")
    add("--preset", default="offline", help="backbones of the random-weight run (default offline)")
    add("--image-size", type=int, help="input size (default 224; quick: 128)")
    add("--mc-samples", "-T", type=int, help="T (default 30; quick: 8)")
    add("--batch-size", type=int, help="images per batch (default 8; quick: 2)")
    add("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    add("--no-local", action="store_true", help="skip the local engine's reference run")
    args = ap.parse_args(argv)
    q = args.quick
    args.workers = [int(w) for w in args.workers.split(",")]
    args.images = args.images or (8 if q else 32)
    args.image_size = args.image_size or (128 if q else 224)
    args.mc_samples = args.mc_samples or (8 if q else 30)
    args.batch_size = args.batch_size or (2 if q else 8)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import ray

    from pixelvote.engine.annotate import annotate
    from pixelvote.engine.ray_engine import annotate_ray

    tmp = Path(tempfile.mkdtemp(prefix="pixelvote-scale-"))
    try:
        run = write_run(build_ensemble(args.preset, args.image_size, torch.device("cpu")), tmp / "run",
                        args.mc_samples)
        images = copy_images(real_images(args.images), tmp / "images")
        common = dict(batch_size=args.batch_size, mc_samples=args.mc_samples, progress=False)
        rows: dict[str, dict[str, Any]] = {}
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for w in args.workers:
                out = tmp / f"ray{w}"
                rows[f"ray x{w}"] = timed(lambda w=w, out=out: annotate_ray(
                    run, images, out, num_workers=w, num_cpus_per_worker=1.0, device="cpu", **common), out)
        finally:
            ray.shutdown()
        if not args.no_local:
            out = tmp / "local"
            rows["local"] = timed(lambda: annotate(run, images, out, device="cpu", **common), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    setup = {"preset": args.preset, "image_size": args.image_size, "T": args.mc_samples,
             "batch_size": args.batch_size, "images": args.images, "ray_cpus": args.cpus,
             "machine_cpus": os.cpu_count(), "torch_threads_local": torch.get_num_threads()}
    print(f"\n{args.preset} @ {args.image_size} px, T={args.mc_samples}, batch {args.batch_size}, "
          f"{args.images} real images, Ray with {args.cpus} CPUs on a {os.cpu_count()}-core machine (noisy)")
    print(f"{'engine':<10}{'wall s':>9}{'wall img/s':>12}{'steady img/s':>14}{'peak RSS/worker MiB':>21}")
    for name, r in rows.items():
        steady = "-" if r["steady_img_s"] is None else f"{r['steady_img_s']:.2f}"
        rss = "-" if r["peak_rss_mib_per_worker"] is None else f"{r['peak_rss_mib_per_worker']:.0f}"
        print(f"{name:<10}{r['wall_s']:>9.1f}{r['wall_img_s']:>12.2f}{steady:>14}{rss:>21}")
    result = {"setup": setup, "results": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
