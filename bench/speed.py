"""Speed and memory of annotation, measured against one forward pass and against the usual way.

    python bench/speed.py [--quick] [--no-naive] [--no-e2e] [--no-memory] [--profile]

For each preset and input size, on the same batch of real images (from ../shared/data) and in one run, it
times per image (median over repeats, after a warm-up; random weights, which cost the same as trained ones):

1. floor      a plain ``torch.inference_mode`` forward of every member (backbone + head), summed over members;
2. pixelvote  the annotation core, with the models as ``annotate`` runs them (batch norms folded into the
              convolutions, which the floor does not get): ``analyze`` (all members, XGrad-CAM of the
              predicted class, T MC samples, per-pixel uncertainty maps) + ``apply_consensus`` (mask, flags);
3. naive      the usual way: pytorch-grad-cam's ``XGradCAM`` per member (full backward) + T full forward
              passes per member with dropout on (no per-pixel uncertainty at all: the naive way is favoured);
4. end to end ``pixelvote.engine.annotate.annotate`` on a folder of real images with a run folder of random
              weights: decode, compute and write every output. The run's models are loaded once beforehand
              (the load is printed separately), so the figure is the per-image cost of a long run. Its
              ratio to the floor is taken per repeat against a floor timed just before it (median of the
              pairs), so that the machine's drift between minutes does not enter the ratio.

It also runs ``pixelvote annotate`` (the CLI) in a subprocess on a small and a large folder of generated PNGs
and compares the peak RSS of the two (streaming: nothing should be kept per image).

It prints a table and, as its last line, one JSON object with ``ratios["<preset>@<size>"]`` holding
``core_over_floor``, ``naive_over_core`` (null with --no-naive) and ``end_to_end_over_floor``.
Targets (printed, not asserted): at 224 px core_over_floor <= 1.15 and naive_over_core >= 20;
end_to_end_over_floor <= 1.3; peak RSS on 500 vs 50 images within 10%.

``--quick``: offline preset, 128 px, T=8, 2 repeats, few images (the smoke test runs it with --no-naive).
``--profile``: profile one analyze call (torch.profiler) and print the top operators, then exit.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixelvote.consensus import ConsensusConfig, apply_consensus  # noqa: E402
from pixelvote.data.imageio import read_image  # noqa: E402
from pixelvote.data.transforms import resize_image, to_tensor  # noqa: E402
from pixelvote.explain.analyze import MapConfig, analyze  # noqa: E402
from pixelvote.models.checkpoint import (  # noqa: E402
    MemberConfig,
    RunConfig,
    load_run,
    member_file,
    save_run_config,
    save_weights,
)
from pixelvote.models.ensemble import Ensemble  # noqa: E402
from pixelvote.models.member import Member, build_member, mc_dropout  # noqa: E402
from pixelvote.models.registry import preset_models  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CLASSES, BACKGROUND = ["lesion", "normal"], "normal"
# the targets of issue 4 ("Speed"): printed beside the measured ratios, not asserted
TARGET_CORE_OVER_FLOOR, TARGET_NAIVE_OVER_CORE, TARGET_E2E_OVER_FLOOR, TARGET_MEMORY_GROWTH = (
    1.15, 20.0, 1.3, 0.10)


# ---------------------------------------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_ensemble(preset: str, size: int, device: torch.device, dropout: float = 0.3,
                   seed: int = 0) -> Ensemble:
    torch.manual_seed(seed)
    members = [build_member(n, len(CLASSES), dropout=dropout, pretrained=False).eval()
               for n in preset_models(preset)]
    return Ensemble(members, CLASSES, BACKGROUND, size).to(device).eval()


def write_run(ens: Ensemble, folder: Path, T: int) -> Path:
    """A run folder holding the ensemble's (random) weights, loadable by ``load_run``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfgs = []
    for i, m in enumerate(ens.members):
        save_weights(folder / member_file(i, m.name), m)
        cfgs.append(MemberConfig(name=m.name, dropout=m.p, file=member_file(i, m.name)))
    save_run_config(folder, RunConfig(classes=ens.classes, background=ens.background,
                                      image_size=ens.image_size, members=cfgs, mc_samples=T))
    return folder


def real_images(n: int) -> list[Path]:
    """``n`` real images, half BUSI (all classes) and half fire (frames, photos, fire-free), evenly spread."""
    pools = [sorted(p for p in (DATA / "busi" / "images").glob("*/*") if p.is_file()),
             sorted(p for p in (DATA / "fire" / "images").glob("*/*") if p.is_file())]
    pools = [p for p in pools if p]
    if not pools:
        raise SystemExit(f"no images under {DATA}/busi/images or {DATA}/fire/images")
    out: list[Path] = []
    for k, pool in enumerate(pools):
        want = n // len(pools) + (1 if k < n % len(pools) else 0)
        step = max(1, len(pool) // max(want, 1))
        out += pool[::step][:want]
    return out


def copy_images(paths: list[Path], dest: Path) -> Path:
    for p in paths:
        d = dest / p.parents[2].name / p.parent.name  # <set>/<class>/<original name>
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, d / p.name)
    return dest


def synthetic_pngs(n: int, dest: Path, hw: tuple[int, int]) -> Path:
    """``n`` distinct small PNGs (noise plus a bright blob), for the memory check."""
    import numpy as np
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        img = (rng.random((*hw, 3)) * 90).astype(np.uint8)
        y, x = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
        img[y:y + hw[0] // 4, x:x + hw[1] // 4] += 140
        Image.fromarray(img).save(dest / f"img_{i:04d}.png")
    return dest


def batch_from(paths: list[Path], size: int) -> torch.Tensor:
    """Decoded and resized exactly as ``annotate`` does: ``(B, 3, size, size) uint8``."""
    return torch.stack([resize_image(to_tensor(read_image(p)), size) for p in paths])


# ------------------------------------------------------------------------------------------ the three ways

def floor_fn(ens: Ensemble, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            xf = ens.normalize(x)
            for m in ens.members:
                m(xf)

    return run


def core_fn(ens: Ensemble, x: torch.Tensor, T: int, seeds: list[int]) -> Callable[[], None]:
    ccfg = ConsensusConfig()

    def run() -> None:
        with torch.no_grad():  # as engine/annotate.py runs it
            a = analyze(ens, x, mc_samples=T, seeds=seeds, maps=MapConfig())
            res = apply_consensus(a, ccfg, ens.background_index)
            res.mask  # noqa: B018

    return run


class _Logits(torch.nn.Module):
    """A member as pytorch-grad-cam expects a model: ``forward(x in [0, 1]) -> logits``."""

    def __init__(self, member: Member) -> None:
        super().__init__()
        self.member = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x)


def naive_fn(ens: Ensemble, x: torch.Tensor, T: int) -> Callable[[], None]:
    from pytorch_grad_cam import XGradCAM

    def run() -> None:
        xf = ens.normalize(x)
        masks = []
        for m in ens.members:
            layer = dict(m.backbone.named_modules())[m.cam_layer]
            cam = XGradCAM(model=_Logits(m), target_layers=[layer])  # calls model.eval(): dropout off
            try:
                grey = cam(input_tensor=xf, targets=None)  # (B, S, S) numpy, min-max normalised per image
            finally:
                cam.activations_and_grads.release()
            m.zero_grad(set_to_none=True)
            with torch.inference_mode(), mc_dropout(m):  # dropout on (only dropout) for the T passes
                probs = torch.stack([torch.softmax(m(xf), -1) for _ in range(T)])
            probs.mean(0), probs.var(0)  # noqa: B018
            masks.append(grey > 0.5)
        import numpy as np

        np.logical_and.reduce(masks)  # the paper's intersection

    return run


# ---------------------------------------------------------------------------------------------- measurements

def time_core(ens: Ensemble, x: torch.Tensor, T: int, repeats: int, naive: bool,
              device: torch.device, naive_repeats: int | None = None) -> dict[str, float]:
    """Seconds per image (median over repeats) of floor, core and naive, interleaved so drift hits all.
    The floor and the naive way run the models as built; the core runs them as ``annotate`` does, with
    batch norms folded into the convolutions (``load_run(..., fold=True)``). ``naive_repeats`` (default
    ``repeats``) limits the naive way's timed runs, which take minutes per batch at 512 px on a CPU."""
    seeds = list(range(x.shape[0]))
    folded = copy.deepcopy(ens)
    folded.fold_batchnorm()
    fns = {"floor": floor_fn(ens, x), "core": core_fn(folded, x, T, seeds)}
    if naive:
        fns["naive"] = naive_fn(ens, x, T)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            if k != "naive" or r < (naive_repeats or repeats):
                times[k].append(elapsed(fn, device))
    return {k: statistics.median(v) / x.shape[0] for k, v in times.items()}


def time_end_to_end(ens: Ensemble, run: Path, images: Path, warm: Path, work: Path, T: int, batch: int,
                    repeats: int, device: torch.device, floor: Callable[[], None],
                    floor_images: int) -> tuple[float, float, float]:
    """(seconds per image, its median ratio to the floor, seconds to load the run once) of ``annotate`` on
    ``images``. The floor is timed again right before each repeat and each ratio is taken within its pair: on
    a shared machine the speed drifts by tens of percent between minutes, which a floor measured earlier
    would turn into a false ratio."""
    import pixelvote.engine.annotate as engine

    t0 = time.perf_counter()
    loaded = load_run(run, device=device, fold=True)  # as annotate loads it
    load_s = time.perf_counter() - t0
    n = sum(1 for p in images.rglob("*") if p.is_file())
    per: list[float] = []
    ratios: list[float] = []
    with mock.patch.object(engine, "load_run", lambda *a, **k: loaded):
        for r in range(repeats + 1):  # the first is a warm-up on a few images
            fl = statistics.median(elapsed(floor, device) for _ in range(3)) / floor_images
            out = work / f"out{r}"
            t0 = time.perf_counter()
            engine.annotate(run, warm if r == 0 else images, out, batch_size=batch, mc_samples=T,
                            device=str(device), progress=False)
            sync(device)
            if r:
                per.append((time.perf_counter() - t0) / n)
                ratios.append(per[-1] / fl)
            shutil.rmtree(out, ignore_errors=True)
    return statistics.median(per), statistics.median(ratios), load_s


# Runs `pixelvote annotate` (sys.argv[1:]) and, at exit, writes the process's own peak RSS (VmHWM) to a file.
# VmHWM belongs to the process image after exec; ``ru_maxrss`` of a child would also count the parent's pages
# that the child held between fork and exec (this benchmark's ~1 GB), which hides what annotate itself uses.
_CLI_WITH_HWM = """
import atexit, os, runpy, sys
def _hwm():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PIXELVOTE_BENCH_HWM"], "w") as f:
        f.write(kib)
atexit.register(_hwm)
sys.argv = ["pixelvote"] + sys.argv[1:]
runpy.run_module("pixelvote.cli", run_name="__main__")
"""


def peak_rss(run: Path, images: Path, out: Path, T: int, batch: int,
             device: torch.device) -> dict[str, float]:
    """Run ``pixelvote annotate`` in its own process; in MiB: its peak RSS (VmHWM at exit), the peak before
    the first image was finished (start-up: imports, models), the highest RSS sampled between the first and
    the last image (``steady``: a per-image leak shows there even when a start-up peak hides it in
    ``peak``); and the wall time in seconds. Decoding workers, if any, are separate processes, not counted."""
    hwm_file = out.parent / (out.name + ".hwm")
    env = {**os.environ, "PIXELVOTE_BENCH_HWM": str(hwm_file),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", _CLI_WITH_HWM, "annotate", "--run", str(run), "--images", str(images),
           "--out", str(out), "--mc-samples", str(T), "--batch-size", str(batch), "--device", str(device),
           "--quiet"]
    log = out.parent / (out.name + ".log")
    steady_kib = startup_kib = 0
    manifest = out / "annotations.jsonl"
    n_images = sum(1 for p in images.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            rss, hwm = _vm_kib(proc.pid)
            done = manifest.read_bytes().count(b"\n") if manifest.exists() else 0
            if done == 0:
                startup_kib = max(startup_kib, hwm)  # the peak so far, before any image is finished
            elif done < n_images:  # between the first and the last image: no start-up, no tear-down
                steady_kib = max(steady_kib, rss)
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not hwm_file.exists():
        raise SystemExit(f"annotate failed ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
    peak_kib = int(hwm_file.read_text())
    return {"peak": peak_kib / 1024.0, "startup": startup_kib / 1024.0, "steady": steady_kib / 1024.0,
            "wall": wall}


def _vm_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS so far) of a process in KiB, from /proc; zeros where unavailable."""
    vals = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.split(":")[0] + ":" in vals:
                    vals[line.split()[0]] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return vals["VmRSS:"], vals["VmHWM:"]


def profile_analyze(preset: str, size: int, batch: int, T: int, device: torch.device, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    ens = build_ensemble(preset, size, device)
    x = batch_from(real_images(batch), size)
    run = core_fn(ens, x, T, list(range(batch)))
    run()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    stages: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=False) as prof, _stage_timers(stages, device):
        run()
    sync(device)
    total = time.perf_counter() - t0
    print(f"profile: {preset} @ {size} px, B={batch}, T={T}, device {device}, "
          f"{torch.get_num_threads()} threads: {total:.3f} s for the call (noisy)")
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    print(f"{'stage (wall; nested stages are inside their callers)':58s} {'calls':>5s} {'ms':>9s} "
          f"{'share':>6s}")
    for name, v in stages.items():
        print(f"{name:58s} {len(v):5d} {sum(v) * 1e3:9.1f} {sum(v) / total:6.1%}")
    floor = floor_fn(ens, x)
    floor()
    print(f"floor (inference_mode forward of all members) for the same batch: {elapsed(floor, device):.3f} s "
          "(noisy)")


_STAGES = [  # (module, function): the steps of one analyze + apply_consensus call
    ("pixelvote.explain.analyze", "run_member"),
    ("pixelvote.explain.analyze", "sample_dropout_masks"),
    ("pixelvote.explain.analyze", "mc_statistics"),
    ("pixelvote.explain.analyze", "member_cams"),
    ("pixelvote.explain.analyze", "xgradcam"),
    ("pixelvote.explain.analyze", "weighted_map"),
    ("pixelvote.explain.analyze", "upsample"),
    ("pixelvote.consensus", "member_thresholds"),
    ("pixelvote.consensus", "fuse_margins"),
]


class _stage_timers:
    """Wrap the steps of the core (module-level names) with wall-clock timers and profiler labels."""

    def __init__(self, out: dict[str, list[float]], device: torch.device) -> None:
        import importlib

        self.out, self.device, self.patches = out, device, []
        for mod_name, fn_name in _STAGES:
            mod = importlib.import_module(mod_name)
            if hasattr(mod, fn_name):
                wrapped = self._wrap(fn_name, getattr(mod, fn_name))
                self.patches.append(mock.patch.object(mod, fn_name, wrapped))
        self.patches.append(mock.patch.object(sys.modules[__name__], "apply_consensus",
                                              self._wrap("apply_consensus", apply_consensus)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            with torch.profiler.record_function(f"stage::{name}"):
                sync(self.device)
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    sync(self.device)
                    self.out.setdefault(name, []).append(time.perf_counter() - t0)

        return timed

    def __enter__(self) -> _stage_timers:
        for p in self.patches:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.patches):
            p.stop()


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--quick", action="store_true", help="offline @ 128 px, T=8, 2 repeats, few images (< 2 min)")
    add("--no-naive", action="store_true", help="skip the pytorch-grad-cam baseline (grad-cam not needed)")
    add("--no-e2e", action="store_true", help="skip the end-to-end annotate timing")
    add("--no-memory", action="store_true", help="skip the peak-RSS check")
    add("--presets", help="comma-separated (default paper,offline-os16,offline; quick: offline)")
    add("--sizes", help="comma-separated input sizes (default 224,512; quick: 128)")
    add("--mc-samples", "-T", type=int, help="T (default 30; quick: 8)")
    add("--repeats", type=int, help="timed repeats after the warm-up (default 5; quick: 2)")
    add("--naive-repeats", type=int, help="timed repeats of the naive way above 224 px (default: --repeats; "
        "one batch of it takes minutes at 512 px on a CPU)")
    add("--batch-size", type=int, help="images per batch, as annotate's (default 8; quick: 2)")
    add("--images", type=int, help="real images for the end-to-end run (default 40; quick: 6)")
    add("--memory-images", help="small,large image counts for the RSS check (default 50,500; quick: 20,60)")
    add("--memory-size", type=int, help="input size of the RSS check's run (default: the smallest of "
        "--sizes; quick: 64)")
    add("--threads", type=int, help="torch intra-op threads here and in the annotate subprocesses (default: "
        "torch's own; quick: 1, since on a small shared machine OpenMP threads that spin-wait for each "
        "other make timings swing several-fold)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--profile", action="store_true", help="profile one analyze + apply_consensus call and exit "
        "(offline @ 224 px, B=8, T=30 unless --presets/--sizes/--batch-size/-T say otherwise)")
    add("--top", type=int, default=20, help="rows of the profile table")
    args = ap.parse_args(argv)
    q = args.quick
    if args.profile:
        args.presets, args.sizes = args.presets or "offline", args.sizes or "224"
        args.mc_samples, args.batch_size = args.mc_samples or 30, args.batch_size or 8
    args.presets = (args.presets or ("offline" if q else "paper,offline-os16,offline")).split(",")
    args.sizes = [int(v) for v in (args.sizes or ("128" if q else "224,512")).split(",")]
    args.mc_samples = args.mc_samples or (8 if q else 30)
    args.repeats = args.repeats or (2 if q else 5)
    args.batch_size = args.batch_size or (2 if q else 8)
    args.images = args.images or (6 if q else 40)
    args.memory_images = [int(v) for v in (args.memory_images or ("20,60" if q else "50,500")).split(",")]
    args.memory_size = args.memory_size or (64 if q else min(args.sizes))
    args.threads = args.threads or (1 if q else None)
    args.device = torch.device(args.device)
    args.naive = not args.no_naive
    return args


def measure(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per preset and size: (ratios, milliseconds per image)."""
    T, B, device = args.mc_samples, args.batch_size, args.device
    paths = real_images(max(args.images, B))
    e2e_dir = copy_images(paths[:args.images], tmp / "images")
    warm_dir = copy_images(paths[:B], tmp / "warm")
    ratios: dict[str, Any] = {}
    ms: dict[str, Any] = {}
    for preset in args.presets:
        for size in args.sizes:
            key = f"{preset}@{size}"
            ens = build_ensemble(preset, size, device)
            x = batch_from(paths[:B], size)
            t = time_core(ens, x, T, args.repeats, args.naive, device,
                          args.naive_repeats if size > 224 else None)
            e2e = e2e_ratio = load_s = None
            if not args.no_e2e:
                run = write_run(ens, tmp / "runs" / key, T)
                e2e, e2e_ratio, load_s = time_end_to_end(ens, run, e2e_dir, warm_dir, tmp / "work" / key,
                                                         T, B, args.repeats, device, floor_fn(ens, x), B)
            fl, co, na = t["floor"], t["core"], t.get("naive")
            ratios[key] = {"core_over_floor": co / fl, "naive_over_core": None if na is None else na / co,
                           "end_to_end_over_floor": e2e_ratio}
            ms[key] = {"floor": fl * 1e3, "core": co * 1e3, "naive": None if na is None else na * 1e3,
                       "end_to_end": None if e2e is None else e2e * 1e3,
                       "run_load": None if load_s is None else load_s * 1e3}
            del ens
    return ratios, ms


def _cell(v: float | None, width: int, fmt: str = ".1f") -> str:
    return f"{'-' if v is None else format(v, fmt):>{width}s}"


def print_table(ratios: dict[str, Any], ms: dict[str, Any]) -> None:
    print(f"\n{'preset@size':16s} {'floor':>8s} {'core':>8s} {'naive':>9s} {'e2e':>8s}   "
          f"{'core/floor':>10s} {'naive/core':>10s} {'e2e/floor':>9s}   (ms per image; noisy)")
    for key, r in ratios.items():
        m = ms[key]
        print(f"{key:16s} {_cell(m['floor'], 8)} {_cell(m['core'], 8)} {_cell(m['naive'], 9)} "
              f"{_cell(m['end_to_end'], 8)}   {_cell(r['core_over_floor'], 10, '.2f')} "
              f"{_cell(r['naive_over_core'], 10, '.2f')} {_cell(r['end_to_end_over_floor'], 9, '.2f')}")
    print(f"targets: at 224 px core/floor <= {TARGET_CORE_OVER_FLOOR:g} and naive/core >= "
          f"{TARGET_NAIVE_OVER_CORE:g}; e2e/floor <= {TARGET_E2E_OVER_FLOOR:g} "
          "(decode + write on top of the core)")
    for key, r in ratios.items():
        notes = []
        if key.endswith("@224"):
            ok = r["core_over_floor"] <= TARGET_CORE_OVER_FLOOR
            notes.append(f"core/floor {'meets' if ok else 'MISSES'} <= {TARGET_CORE_OVER_FLOOR:g}")
        if r["naive_over_core"] is not None and key.endswith("@224"):
            ok = r["naive_over_core"] >= TARGET_NAIVE_OVER_CORE
            notes.append(f"naive/core {'meets' if ok else 'MISSES'} >= {TARGET_NAIVE_OVER_CORE:g}")
        if r["end_to_end_over_floor"] is not None:
            ok = r["end_to_end_over_floor"] <= TARGET_E2E_OVER_FLOOR
            notes.append(f"e2e/floor {'meets' if ok else 'MISSES'} <= {TARGET_E2E_OVER_FLOOR:g}")
        if ms[key]["run_load"] is not None:
            notes.append(f"run load {ms[key]['run_load']:.0f} ms once, not in e2e")
        print(f"  {key}: " + "; ".join(notes))


def measure_memory(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Peak RSS of ``pixelvote annotate`` on a small and a large folder, one process each."""
    preset = "offline" if "offline" in args.presets else args.presets[0]
    size, ns, hw = args.memory_size, args.memory_images, ((80, 96) if args.quick else (400, 500))
    ens = build_ensemble(preset, size, torch.device("cpu"))
    run = write_run(ens, tmp / "runs" / "memory", args.mc_samples)
    rss: dict[int, dict[str, float]] = {}
    for n in ns:
        imgs = synthetic_pngs(n, tmp / f"mem{n}", hw)
        rss[n] = peak_rss(run, imgs, tmp / f"memout{n}", args.mc_samples, args.batch_size, args.device)
        shutil.rmtree(imgs, ignore_errors=True)
    lo, hi = rss[ns[0]], rss[ns[-1]]
    growth = (hi["peak"] - lo["peak"]) / lo["peak"]
    steady = (hi["steady"] - lo["steady"]) / lo["steady"] if lo["steady"] else float("nan")
    ok = abs(growth) < TARGET_MEMORY_GROWTH
    print(f"\npeak RSS of `pixelvote annotate` ({preset} @ {size} px, {hw[1]}x{hw[0]} PNGs, "
          "a process each):")
    for n in ns:
        print(f"  {n:5d} images: peak {rss[n]['peak']:6.0f} MiB (before the first image was done: "
              f"{rss[n]['startup']:.0f}), steady {rss[n]['steady']:6.0f} MiB, {rss[n]['wall']:.1f} s")
    print(f"  peak growth {growth * 100:+.1f}% ({'meets' if ok else 'MISSES'} < "
          f"{TARGET_MEMORY_GROWTH * 100:.0f}%); steady (between first and last image) growth "
          f"{steady * 100:+.1f}%")
    return {"preset": preset, "size": size, "images": ns,
            "peak_rss_mib": [round(rss[n]["peak"], 1) for n in ns],
            "startup_peak_rss_mib": [round(rss[n]["startup"], 1) for n in ns],
            "steady_rss_mib": [round(rss[n]["steady"], 1) for n in ns],
            "wall_s": [round(rss[n]["wall"], 2) for n in ns], "growth": growth, "growth_steady": steady,
            "target_growth": TARGET_MEMORY_GROWTH}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # subprocesses
    if args.profile:
        profile_analyze(args.presets[0], args.sizes[0], args.batch_size, args.mc_samples, args.device,
                        args.top)
        return {}
    if args.naive:
        try:
            import pytorch_grad_cam  # noqa: F401
        except ImportError:
            raise SystemExit("the naive baseline needs pytorch-grad-cam: pip install grad-cam "
                             "(or pass --no-naive)") from None
    print(f"# pixelvote speed ({'quick' if args.quick else 'full'}): device {args.device}, "
          f"{torch.get_num_threads()} torch threads, T={args.mc_samples}, batch {args.batch_size}, "
          f"{args.repeats} repeats after a warm-up (medians; timings on a shared machine are noisy)")
    memory = None
    with tempfile.TemporaryDirectory(prefix="pixelvote-speed-") as tmp_s:
        tmp = Path(tmp_s)
        ratios, ms = measure(args, tmp)
        print_table(ratios, ms)
        if not args.no_memory:
            memory = measure_memory(args, tmp)
    result = _finite({"ratios": ratios, "ms_per_image": ms, "memory": memory, "config": {
        "quick": args.quick, "device": str(args.device), "threads": torch.get_num_threads(),
        "T": args.mc_samples, "batch_size": args.batch_size, "repeats": args.repeats,
        "e2e_images": args.images, "naive": args.naive}})
    print(json.dumps(result, allow_nan=False))
    return result


def _finite(v: Any) -> Any:
    """NaN or infinity -> None, so the last line is strict JSON."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


if __name__ == "__main__":
    main()
