"""Throughput of the Ray engine with 1 and 2 workers on this machine, and the memory of each worker.

    python bench/scale.py [--quick] [--workers 1,2] [--images 32] [--preset offline] [--image-size 224]
                          [-T 30] [--batch-size 8] [--cpus 2] [--no-local]

On real images (half BUSI, half fire, from ../shared/data) and a run folder of random weights (they cost the
same as trained ones; nothing is downloaded), it starts one local Ray instance with ``--cpus`` CPUs and runs
``annotate_ray`` once per worker count, each into a fresh output folder, then (for reference) the local
engine on the same images. For each it prints:

- ``wall img/s``: images / wall time of the whole call, including starting the workers and loading the models;
- ``steady img/s``: what a long run gets, start-up excluded: each configuration also annotates a small
  folder (one batch per worker) into another output folder, and ``steady = (N - n_small) / (wall_N -
  wall_small)`` (both calls pay the same start-up);
- ``start-up s``: ``wall_small`` minus the small folder's share at the steady rate;
- ``private MiB/worker``: the highest private memory (RssAnon + RssFile: heap, tensors, models, libraries)
  sampled in the Ray worker processes that ran the annotator (Linux ``/proc``), and ``shm MiB/worker`` the
  highest RssShmem: pages of Ray's shared-memory object store the worker touched while handing its results
  over (they belong to the object store, which Ray caps, not to the worker; VmHWM counts both).

Each Ray worker takes 1 CPU and 1 torch thread (``num_cpus_per_worker=1``); the local engine runs first,
before Ray starts, with ``--local-threads`` torch threads (default 1, the same as one worker). On a small
shared machine the figures are noisy: read them as an order of magnitude. The last line is one JSON object.
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
    """Polls the peak RSS of the annotator processes that start after it until stopped."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.before = set(_annotator_memory())  # workers of an earlier run that have not exited yet
        self.private_kib: dict[int, int] = {}
        self.shm_kib: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, (private, shm) in _annotator_memory().items():
                if pid not in self.before:
                    self.private_kib[pid] = max(private, self.private_kib.get(pid, 0))
                    self.shm_kib[pid] = max(shm, self.shm_kib.get(pid, 0))
            time.sleep(self.period)


def _annotator_memory() -> dict[int, tuple[int, int]]:
    """``{pid: (RssAnon + RssFile, RssShmem) in KiB}`` of the Ray worker processes running the annotator
    (their title names it)."""
    found: dict[int, tuple[int, int]] = {}
    if not Path("/proc").is_dir():
        return found
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"_Annotator" not in (d / "cmdline").read_bytes():
                continue
            lines = (d / "status").read_text().splitlines()
            kib = {line.split(":")[0]: int(line.split()[1]) for line in lines
                   if line.startswith(("RssAnon:", "RssFile:", "RssShmem:"))}
            found[int(d.name)] = (kib.get("RssAnon", 0) + kib.get("RssFile", 0), kib.get("RssShmem", 0))
        except OSError:
            continue
    return found


def timed(fn: Any, small: Path, full: Path, tmp: Path, memory: bool) -> dict[str, Any]:
    """``fn(images, out)`` on the small folder, then (watched) on the full one."""
    t0 = time.perf_counter()
    n_small = fn(small, tmp / "out_small").annotated
    wall_small = time.perf_counter() - t0
    watch = Watch()
    watch.start()
    t0 = time.perf_counter()
    n = fn(full, tmp / "out_full").annotated
    wall = time.perf_counter() - t0
    time.sleep(0.3)
    watch.stop.set()
    watch.join()
    steady = (n - n_small) / (wall - wall_small) if wall > wall_small and n > n_small else None
    private = [v / 1024.0 for v in watch.private_kib.values()] if memory else []
    shm = [v / 1024.0 for v in watch.shm_kib.values()] if memory else []
    return {"images": n, "wall_s": round(wall, 2), "wall_img_s": round(n / wall, 3),
            "steady_img_s": None if steady is None else round(steady, 3),
            "startup_s": None if steady is None else round(wall_small - n_small / steady, 1),
            "workers_seen": len(private),
            "private_mib_per_worker": round(max(private), 1) if private else None,
            "shm_mib_per_worker": round(max(shm), 1) if shm else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--quick", action="store_true", help="offline @ 128 px, T=8, 12 images, batch 2 (about 2 min)")
    add("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    add("--images", type=int, help="real images (default 48; quick: 12)")
    add("--preset", default="offline", help="backbones of the random-weight run (default offline)")
    add("--image-size", type=int, help="input size (default 224; quick: 128)")
    add("--mc-samples", "-T", type=int, help="T (default 30; quick: 8)")
    add("--batch-size", type=int, help="images per batch (default 8; quick: 2)")
    add("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    add("--no-local", action="store_true", help="skip the local engine's reference run")
    add("--local-threads", type=int, default=1, help="torch threads of the local engine (default 1)")
    args = ap.parse_args(argv)
    q = args.quick
    args.workers = [int(w) for w in args.workers.split(",")]
    args.images = args.images or (12 if q else 48)
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
        paths = real_images(args.images)
        full = copy_images(paths, tmp / "images")
        common = dict(batch_size=args.batch_size, mc_samples=args.mc_samples, progress=False)
        rows: dict[str, dict[str, Any]] = {}
        if not args.no_local:
            threads = torch.get_num_threads()
            torch.set_num_threads(args.local_threads)
            small = copy_images(paths[:: max(1, len(paths) // args.batch_size)][:args.batch_size],
                                tmp / "small_local")
            rows[f"local ({args.local_threads} thr)"] = timed(
                lambda images, out: annotate(run, images, out, device="cpu", **common), small, full,
                tmp / "local", memory=False)
            torch.set_num_threads(threads)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for w in args.workers:
                n_small = w * args.batch_size  # one batch per worker
                small = copy_images(paths[:: max(1, len(paths) // n_small)][:n_small], tmp / f"small{w}")
                rows[f"ray x{w}"] = timed(lambda images, out, w=w: annotate_ray(
                    images=images, out=out, run=run, num_workers=w, num_cpus_per_worker=1.0, device="cpu",
                    **common), small, full, tmp / f"ray{w}", memory=True)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    setup = {"preset": args.preset, "image_size": args.image_size, "T": args.mc_samples,
             "batch_size": args.batch_size, "images": args.images, "ray_cpus": args.cpus,
             "machine_cpus": os.cpu_count(), "torch_threads_local": torch.get_num_threads()}
    print(f"\n{args.preset} @ {args.image_size} px, T={args.mc_samples}, batch {args.batch_size}, "
          f"{args.images} real images, Ray with {args.cpus} CPUs on a {os.cpu_count()}-core machine (noisy)")
    print(f"{'engine':<16}{'wall s':>8}{'wall img/s':>12}{'steady img/s':>14}{'start-up s':>12}"
          f"{'private MiB/worker':>20}{'shm MiB/worker':>16}")
    for name, r in rows.items():
        steady = "-" if r["steady_img_s"] is None else f"{r['steady_img_s']:.2f}"
        start = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        mem = "".join(f"{'-' if r[k] is None else format(r[k], '.0f'):>{w}}"
                      for k, w in (("private_mib_per_worker", 20), ("shm_mib_per_worker", 16)))
        print(f"{name:<16}{r['wall_s']:>8.1f}{r['wall_img_s']:>12.2f}{steady:>14}{start:>12}{mem}")
    result = {"setup": setup, "results": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
