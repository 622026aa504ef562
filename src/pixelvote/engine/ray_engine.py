"""Ray engine: annotate a large image collection on a Ray cluster, with the local engine's outputs.

The driver lists the inputs, skips what the manifest already holds, and streams the rest through
``Dataset.map_batches`` with a fixed pool of actors. Each actor loads the ensemble once (the run's files
are shipped from the driver, so workers need no copy of the run folder), decodes its images, analyses
them with the local engine's own functions and per-image seeds, and returns one small row per image: the
manifest record (JSON) and the mask, overlay and uncertainty files as bytes. The driver writes each image's
files atomically and then appends its manifest line, in input order: one writer, one manifest, the same
lock, skipped.jsonl and resumability as :func:`pixelvote.engine.annotate.annotate`. Workers must be able
to read the images (a shared filesystem, or a pyarrow/fsspec URI); they never write to the output folder.

Ray is optional (``pip install 'pixelvote[ray]'``); this module imports it only when a run starts.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from pixelvote.consensus import ConsensusConfig
from pixelvote.data.imageio import (
    IMAGE_EXTENSIONS,
    append_jsonl,
    check_out_dir,
    read_image,
    write_bytes_atomic,
)
from pixelvote.data.transforms import fit_image, to_tensor
from pixelvote.engine.annotate import (
    AnnotateSummary,
    _Decode,
    _drop_fixed,
    _exclusive,
    _finish,
    _Writer,
    batch_results,
    plan,
    resolve_recipe,
)
from pixelvote.engine.inputs import Item, _unique_keys, list_inputs
from pixelvote.engine.render import OUTPUT_FILES, encode_outputs, opencv
from pixelvote.errors import ConfigError, DataError
from pixelvote.explain.analyze import MapConfig
from pixelvote.models.checkpoint import RunConfig, load_run, member_file

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pixelvote[ray]'  (or: pip install 'ray[data]')"
_FILES = tuple(OUTPUT_FILES)


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"the Ray engine needs Ray, which is not installed here ({exc})",
                          fix=INSTALL_HINT) from None
    return ray


def annotate_ray(run: str | Path, images: str | Path, out: str | Path, *, batch_size: int = 8,
                 mc_samples: int | None = None, num_workers: int = 2, address: str | None = None,
                 num_cpus_per_worker: float = 1.0, num_gpus_per_worker: float | None = None,
                 device: str | None = None, consensus: dict[str, Any] | None = None,
                 maps: dict[str, Any] | None = None, method: str = "run",
                 segmenter: str | Path | None = None, segmenter_min_iou: float = 0.2,
                 progress: bool = True, _fault_marker: str | None = None) -> AnnotateSummary:
    """Annotate ``images`` into ``out`` on Ray: same files, manifest and resumability as ``annotate``.

    ``images``: a local folder or CSV manifest (as the local engine), or the URI of a folder on any
    pyarrow or fsspec filesystem (``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``; ``file://`` is a local
    path). ``num_workers`` actors each load the ensemble once and take ``num_cpus_per_worker`` CPUs and
    ``num_gpus_per_worker`` GPUs (default: 1 when the cluster has GPUs and ``device`` is not "cpu").
    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); without it, and
    when Ray is not already initialised in this process, a local Ray instance with just enough CPUs is
    started and stopped at the end. A worker that dies is restarted by Ray and its batch retried;
    unreadable images go to skipped.jsonl. ``_fault_marker`` is for tests: the first batch kills its worker
    once (when that file does not exist yet)."""
    ray = require_ray()
    if batch_size < 1 or num_workers < 1:
        raise ConfigError(f"expected batch_size >= 1 and num_workers >= 1 but got {batch_size} and "
                          f"{num_workers}")
    if num_cpus_per_worker <= 0 or (num_gpus_per_worker is not None and num_gpus_per_worker < 0):
        raise ConfigError(f"expected num_cpus_per_worker > 0 and num_gpus_per_worker >= 0 but got "
                          f"{num_cpus_per_worker} and {num_gpus_per_worker}")
    out, run = check_out_dir(out), Path(run)
    opencv()
    ens, cfg = load_run(run, device="cpu")  # validates the run here, before any worker starts
    ccfg, mcfg, T = resolve_recipe(cfg, method, consensus, maps, mc_samples)
    run_files, seg_files = ship(run, cfg, segmenter)
    items, names, fs_uri = resolve_inputs(images)
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=max(1, math.ceil(num_workers * num_cpus_per_worker)), include_dashboard=False)
        else:
            ray.init(address=address)
        started = True
    try:
        gpus = num_gpus_per_worker
        if gpus is None:
            gpus = 1.0 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        actor = dict(run_files=run_files, seg_files=seg_files, seg_min_iou=segmenter_min_iou, ccfg=ccfg,
                     mcfg=mcfg, T=T, device=device or ("cuda" if gpus > 0 else "cpu"),
                     threads=max(1, int(num_cpus_per_worker)), fs_uri=fs_uri, fault_marker=_fault_marker)
        with _exclusive(out):
            return _run_locked(ray, ens, run, items, names, out, ccfg, mcfg, batch_size, num_workers,
                               num_cpus_per_worker, gpus, actor, progress)
    finally:
        if started:
            ray.shutdown()


def ship(run: Path, cfg: RunConfig, segmenter: str | Path | None = None
         ) -> tuple[dict[str, bytes], dict[str, bytes] | None]:
    """The files a worker needs to load the run (and the segmenter), by path relative to their folder."""
    run_files = {"run.json": (run / "run.json").read_bytes()}
    for i, m in enumerate(cfg.members):
        name = m.file or member_file(i, m.name)
        run_files[name] = (run / name).read_bytes()
    if segmenter is None:
        return run_files, None
    from pixelvote.segment.train import load_segmenter

    load_segmenter(segmenter, device="cpu")  # a broken segmenter fails here, not on every worker
    names = ("segmenter.json", "segmenter.safetensors")
    return run_files, {n: (Path(segmenter) / n).read_bytes() for n in names}


def _run_locked(ray: Any, ens: Any, run: Path, items: list[Item], names: list[str] | None, out: Path,
                ccfg: ConsensusConfig, mcfg: MapConfig, batch_size: int, num_workers: int, cpus: float,
                gpus: float, actor: dict[str, Any], progress: bool) -> AnnotateSummary:
    pending_at, summary, already_skipped = plan(out, run, ens, items, ccfg, mcfg, names)
    skipped_path = out / "skipped.jsonl"
    if not pending_at:
        return _finish(summary, out)
    rows = [_row(items[i], None if names is None else names[i]) for i in pending_at]
    _check_resources(ray, num_workers, cpus, gpus)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # the manifest keeps the inputs' order, as the local engine
    ctx.enable_progress_bars = False
    writer = _Writer(out, write=functools.partial(_write_encoded, out))
    writer.start()
    bar = tqdm(total=len(rows), desc="annotating (ray)", unit="img", disable=not progress)
    try:
        # blocks of at most ~256 images (Ray's default is 200 blocks), so that many workers share a long run
        # evenly; map_batches bundles smaller blocks up to batch_size
        blocks = min(len(rows), max(200, math.ceil(len(rows) / 256)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            _Annotator, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs=actor)
        for row in ds.iter_rows():
            if row["error"]:
                log.warning("skipped: %s", row["error"])
                summary.skipped += 1
                if row["shown"] not in already_skipped:
                    append_jsonl(skipped_path, {"image": row["shown"], "reason": row["error"]})
            else:
                writer.put((json.loads(row["record"]), {k: row[k] for k in _FILES}))
                summary.annotated += 1
            bar.update(1)
    finally:
        bar.close()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        writer.close()
    _drop_fixed(skipped_path, out)
    return _finish(summary, out)


def _check_resources(ray: Any, num_workers: int, cpus: float, gpus: float) -> None:
    have = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if each and num_workers * each > have.get(name, 0):
            log.warning("%d workers x %s %s > the cluster's %s %s: Ray will wait for (or autoscale to) "
                        "the missing resources", num_workers, each, name, have.get(name, 0), name)


def _write_encoded(out: Path, record: dict[str, Any], pngs: dict[str, bytes]) -> None:
    """The driver's write of one image: its PNGs atomically, then its manifest line (as the local engine)."""
    for name in _FILES:
        write_bytes_atomic(out / record[name], pngs[name])
    append_jsonl(out / "annotations.jsonl", record)


# ------------------------------------------------------------------------------------------------ inputs

def resolve_inputs(images: str | Path) -> tuple[list[Item], list[str] | None, str | None]:
    """``(items, names, fs_uri)``: local inputs as ``list_inputs`` gives them (``names`` None, ``fs_uri``
    None), or the images under a filesystem URI (``Item.path`` the path inside that filesystem, ``names``
    their URIs)."""
    text = str(images)
    scheme = urlparse(text).scheme if "://" in text else ""
    if not scheme or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return list_inputs(images), None, None
    if scheme == "file":
        return list_inputs(unquote(urlparse(text).path)), None, None
    return (*list_uri_inputs(text), text)


def _filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a URI: pyarrow's own, else any fsspec protocol."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as pa_exc:  # ArrowInvalid for a scheme pyarrow does not know
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        except Exception as exc:
            raise DataError(f"cannot open this URI with pyarrow ({pa_exc}) or fsspec ({exc})", path=uri,
                            fix="install the filesystem's package (s3fs, gcsfs, adlfs, ...) or pass a local "
                                "path") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def list_uri_inputs(uri: str) -> tuple[list[Item], list[str]]:
    """The images below the folder at ``uri`` (recursively, hidden names skipped, sorted), with the local
    engine's key rules: the stem, or the relative path without extension when stems collide."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise DataError("a URI must name a folder of images (CSV manifests are read from local paths "
                            "only)", path=uri, fix="pass the folder's URI, or a local CSV")
        if info.type != pafs.FileType.Directory:
            raise DataError("input not found", path=uri, fix="check the URI")
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise DataError(f"cannot list this URI ({exc})", path=uri,
                        fix="check the URI and its credentials") from None
    base = PurePosixPath(root)
    rels = sorted(PurePosixPath(f.path).relative_to(base) for f in found if f.type == pafs.FileType.File)
    rels = [r for r in rels if r.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in r.parts)]
    if not rels:
        raise DataError("no images found (PNG, JPEG, BMP or TIFF, searched recursively)", path=uri,
                        fix="check the URI")
    stems: dict[str, int] = {}
    no_ext: dict[str, int] = {}
    for r in rels:
        stems[r.stem] = stems.get(r.stem, 0) + 1
        no_ext[r.with_suffix("").as_posix()] = no_ext.get(r.with_suffix("").as_posix(), 0) + 1
    items = []
    for r in rels:
        key = r.stem
        if stems[r.stem] > 1:
            key = r.with_suffix("").as_posix()
            if no_ext[key] > 1:
                key = r.as_posix()
        items.append(Item(Path((base / r).as_posix()), key))
    items = _unique_keys(items)
    prefix = uri.rstrip("/")
    return items, [f"{prefix}/{PurePosixPath(it.path).relative_to(base).as_posix()}" for it in items]


def _row(item: Item, name: str | None) -> dict[str, str]:
    """What a worker needs to know about one input (``id``: its manifest name; ``shown``: skipped.jsonl's)."""
    if name is None:
        return {"path": str(item.path), "key": item.key, "id": str(item.path.resolve()),
                "shown": str(item.path)}
    return {"path": PurePosixPath(item.path).as_posix(), "key": item.key, "id": name, "shown": name}


# ----------------------------------------------------------------------------------------------- workers

class _Annotator:
    """A Ray Data actor: loads the ensemble once, then annotates batches of input rows into output rows."""

    def __init__(self, run_files: dict[str, bytes], seg_files: dict[str, bytes] | None, seg_min_iou: float,
                 ccfg: ConsensusConfig, mcfg: MapConfig, T: int, device: str, threads: int,
                 fs_uri: str | None, fault_marker: str | None = None) -> None:
        torch.set_num_threads(threads)
        self.threads = threads
        with tempfile.TemporaryDirectory(prefix="pixelvote-run-") as tmp:
            self.ens, _ = load_run(_unpack(run_files, Path(tmp) / "run"), device=device, fold=True)
            self.seg: tuple | None = None
            if seg_files is not None:
                from pixelvote.segment.train import load_segmenter

                model, scfg = load_segmenter(_unpack(seg_files, Path(tmp) / "seg"), device=self.ens.device)
                self.seg = (model, scfg, seg_min_iou)
        self.ccfg, self.mcfg, self.T = ccfg, mcfg, T
        self.fs = _filesystem(fs_uri)[0] if fs_uri else None
        self.fault_marker = fault_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        if self.fault_marker and not Path(self.fault_marker).exists():
            import os

            Path(self.fault_marker).touch()
            os._exit(1)  # a worker that dies mid-run (tests): Ray restarts it and retries this batch
        rows = [{k: str(batch[k][i]) for k in batch} for i in range(len(batch["key"]))]
        decoded = [self._decode(r) for r in rows]
        good = [d for d in decoded if "error" not in d]
        done: dict[str, tuple[dict[str, Any], dict[str, bytes]]] = {}
        results = batch_results(self.ens, self.ccfg, self.mcfg, self.T, good, self.seg) if good else iter(())
        from pixelvote.refine import crf

        with crf.workers(max(1, self.threads)):  # the CRF's processes stay within this actor's CPUs
            for record, image, mask, heat, unc in results:
                done[record["key"]] = record, encode_outputs(image, mask, heat, unc)
        cols: dict[str, list] = {c: [] for c in ("key", "shown", "error", "record", *_FILES)}
        for r, d in zip(rows, decoded, strict=True):
            cols["key"].append(r["key"])
            cols["shown"].append(r["shown"])
            cols["error"].append(d.get("error", ""))
            rec, pngs = done.get(r["key"], ({}, {}))
            if rec:
                rec["image"] = r["id"]  # as the driver names it (resumability compares this)
            cols["record"].append(json.dumps(rec, ensure_ascii=False) if rec else "")
            for k in _FILES:
                cols[k].append(pngs.get(k, b""))
        return cols

    def _decode(self, row: dict[str, str]) -> dict[str, Any]:
        item = Item(Path(row["path"]), row["key"])
        if self.fs is None:
            return _Decode([item], self.ens.image_size, self.ens.resize)[0]
        try:
            with self.fs.open_input_file(row["path"]) as fh:
                data = fh.read()
            with tempfile.NamedTemporaryFile(suffix=PurePosixPath(row["path"]).suffix) as tmp:
                tmp.write(data)
                tmp.flush()
                img = read_image(tmp.name)
        except DataError as exc:
            return {"item": item, "error": str(DataError(exc.problem, path=row["id"], fix=exc.fix))}
        except OSError as exc:
            return {"item": item, "error": str(DataError(f"cannot read it ({exc})", path=row["id"],
                                                         fix="check that the workers can read this URI"))}
        x = fit_image(to_tensor(img), self.ens.image_size, self.ens.resize)
        return {"item": item, "image": img, "input": x}


def _unpack(files: dict[str, bytes], folder: Path) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder

