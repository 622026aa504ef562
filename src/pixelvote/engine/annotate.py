"""Local annotation engine: stream images through the ensemble, write masks and a manifest, resumably.

Decoding runs in DataLoader workers and writing in a background thread, so the model is never idle waiting
for files. Each image's files are written atomically before its manifest line is appended (and fsynced), so
a killed run loses at most the images in flight, and a re-run skips every image already in the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelvote.consensus import ConsensusConfig, apply_consensus
from pixelvote.data.imageio import (
    append_jsonl,
    check_out_dir,
    read_image,
    read_jsonl,
    repair_jsonl_tail,
    write_bytes_atomic,
    write_json_atomic,
)
from pixelvote.data.transforms import crop_content, fit_image, resize_uint8, to_tensor
from pixelvote.engine.inputs import Item, list_inputs
from pixelvote.engine.render import encode_outputs, opencv, output_paths, to_levels
from pixelvote.errors import ConfigError, DataError, did_you_mean
from pixelvote.explain.analyze import MapConfig, analyze, upsample
from pixelvote.models.checkpoint import RunConfig, load_run
from pixelvote.models.ensemble import Ensemble
from pixelvote.refine.crf import CRFConfig

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


@dataclass
class AnnotateSummary:
    out: Path
    total: int = 0
    annotated: int = 0
    already_done: int = 0
    skipped: int = 0
    flagged: int = 0
    labels: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "total": self.total, "annotated": self.annotated,
                "already_done": self.already_done, "skipped": self.skipped, "flagged": self.flagged,
                "labels": self.labels}


class _Decode(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], size: int, resize: str = "squash") -> None:
        self.items, self.size, self.resize = items, size, resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            img = read_image(item.path)
        except DataError as exc:
            return {"item": item, "error": str(exc)}
        t = to_tensor(img)
        return {"item": item, "image": img, "input": fit_image(t, self.size, self.resize)}


def default_workers(device: torch.device) -> int:
    """Decoding processes: on a GPU, up to 4 CPU cores feed it; on a CPU only the cores that torch's own
    threads leave free (on a 2-core machine none: a worker there only adds copying and contention, 59 vs
    64 ms per image in bench/speed.py's end-to-end run)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(0, min(4, cores - 1))
    return max(0, min(2, cores - (torch.get_num_threads() or 1)))


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _die_with_parent(parent: int, worker_id: int) -> None:
    """A decoding worker ends when the annotate process does, even by SIGKILL (Linux): otherwise a worker
    blocked on a full queue outlives it, holding its memory. Elsewhere PyTorch's own watchdog applies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


class _Writer(threading.Thread):
    """Writes each image's PNGs, then its manifest line; errors are kept and re-raised in the main thread."""

    def __init__(self, out: Path, write: Callable[..., None] | None = None) -> None:
        super().__init__(daemon=True)
        self.out = out
        self.q: queue.Queue = queue.Queue(maxsize=32)
        self.error: BaseException | None = None
        self.write = write or self._write  # the Ray engine passes one that writes encoded PNGs
        self.pending: list[dict[str, Any]] = []  # records whose files are written but not yet synced

    def run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                self._flush()
                return
            if self.error is not None:
                continue
            try:
                self.write(*job)
                if self.q.empty() or len(self.pending) >= 16:
                    self._flush()
            except BaseException as exc:  # surfaced by close()
                self.error = exc

    def _write(self, record: dict[str, Any], image: np.ndarray, mask: np.ndarray, heat: np.ndarray,
               unc: np.ndarray) -> None:
        for name, data in encode_outputs(image, mask, heat, unc).items():
            write_bytes_atomic(self.out / record[name], data, durable=False)
        self.pending.append(record)

    def _flush(self) -> None:
        """Make the pending images' files durable with one sync, then append their manifest lines: a record
        is never in the manifest before its files are on disk, at one sync per batch instead of four per
        image."""
        if not self.pending or self.error is not None:
            return
        os.sync()
        append_jsonl(self.out / "annotations.jsonl", self.pending)
        self.pending = []

    def put(self, job: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(job)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on ``out`` so that two annotate processes cannot append the same images to one manifest.

    A POSIX record lock: the operating system drops it when this process ends, even by SIGKILL, and decoding
    workers do not inherit it. Where locks are not available (Windows, some network file systems) the run goes
    ahead unlocked."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out / ".annotate.lock", "a") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise DataError("another `pixelvote annotate` is writing to this folder", path=out,
                                fix="wait for it to finish, or pass another --out") from None
            log.warning("%s: cannot lock the output folder (%s); make sure no other run writes to it",
                        out, exc)
        yield


def _prepare_out(out: Path, run: Path, ens: Ensemble, consensus: ConsensusConfig,
                 maps: MapConfig) -> dict[str, str]:
    """Write annotate.json; the keys already in the manifest, each with its image."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "annotate.json"
    now = {
        "format_version": MANIFEST_VERSION, "classes": ens.classes, "background": ens.background,
        "run": str(Path(run).resolve()), "consensus": consensus.model_dump(mode="json"),
        "maps": maps.model_dump(mode="json"),
        "image_size": ens.image_size, "resize": ens.resize, "decision_threshold": ens.decision_threshold,
        "decision_evidence": None if ens.evidence_rule is None else ens.evidence_rule.model_dump(),
        "members": [m.name for m in ens.members],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("classes") not in (None, ens.classes):
            raise DataError(f"this folder holds annotations of classes {meta.get('classes')}, "
                            f"but the run has {ens.classes}", path=out,
                            fix="use another --out folder for this run")
        if (out / "annotations.jsonl").is_file() and (out / "annotations.jsonl").stat().st_size:
            changed = _recipe_changes(meta, now)
            if changed:
                raise DataError(f"this folder was annotated with another run or recipe "
                                f"({'; '.join(changed)}): going on would mix two kinds of masks in it",
                                path=out,
                                fix="pass another --out for this run or these options, or re-run with the "
                                    "ones the folder's annotate.json records")
    write_json_atomic(meta_path, now)
    manifest = out / "annotations.jsonl"
    repair_jsonl_tail(manifest)
    return {str(rec.get("key")): str(rec.get("image")) for rec in read_jsonl(manifest)}


# what makes the masks: annotate.json's other keys (run path, creation time) may change between runs
RECIPE_KEYS = ("members", "image_size", "resize", "decision_threshold", "consensus", "maps")


def _recipe_changes(before: dict, now: dict) -> list[str]:
    """The recipe settings an output folder's annotate.json records that differ from ``now``'s (settings an
    older folder does not record are not compared)."""
    def show(v: object) -> str:
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    changes = []
    for key in RECIPE_KEYS:
        old, new = before.get(key), now[key]
        if key not in before or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{k} {show(old[k])} -> {show(new[k])}" for k in sorted(old.keys() & new.keys())
                        if old[k] != new[k]]
        else:
            changes.append(f"{key} {show(old)} -> {show(new)}")
    return changes


def check_labels(items: list[Item], classes: list[str], images: str | Path) -> None:
    unknown = sorted({str(it.label) for it in items} - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not classes of this run ({classes})", path=Path(images),
                        fix="name the class folders (or the CSV's labels) as the run's classes, or annotate "
                            "without --labels")


PAPER_METHOD = {"consensus": {"policy": "unanimous", "fusion": "intersection", "threshold_method": "fixed",
                               "threshold": 0.5, "refine": "none", "colour_weight": 0.0,
                               "tone_weight": 0.0}, "maps": {}}


METHODS = ("run", "best", "paper")


def method_recipe(cfg: RunConfig, method: str, labels: bool = False) -> tuple[ConsensusConfig, MapConfig]:
    """``run``: the recipe calibration chose within the annotation cost limit (with ``labels``, the one it
    chose for labelled images, where the run has one); ``best``: the best one within the (higher)
    pseudo-label cost limit, for masks that train a segmenter (a run without one falls back to ``run``);
    ``paper``: plain XGrad-CAM, unanimous intersection at 0.5 of each map's maximum."""
    if method not in METHODS:
        raise ConfigError(f"unknown method: {did_you_mean(method, list(METHODS))}")
    if method == "paper":
        return cfg.consensus.model_copy(update=PAPER_METHOD["consensus"]), MapConfig()
    if method == "run" and labels and cfg.labelled is not None:
        return cfg.labelled.consensus, cfg.labelled.maps
    if method == "best":
        if cfg.best is not None:
            return cfg.best.consensus, cfg.best.maps
        log.warning("this run has no 'best' recipe (it was trained by an older pixelvote): using its own")
    return cfg.consensus, cfg.maps


def resolve_recipe(cfg: RunConfig, method: str, consensus: dict[str, Any] | None, maps: dict[str, Any] | None,
                   mc_samples: int | None, labels: bool = False) -> tuple[ConsensusConfig, MapConfig, int]:
    """The consensus and map settings and T that :func:`annotate` uses for ``method`` and the overrides."""
    ccfg, mcfg = method_recipe(cfg, method, labels)
    ccfg = ConsensusConfig.model_validate({**ccfg.model_dump(), **(consensus or {})})
    mcfg = MapConfig.model_validate({**mcfg.model_dump(), **(maps or {})})
    if ccfg.refine == "crf":
        from pixelvote.refine import crf

        if not crf.available():
            raise ConfigError("this run's masks are refined with a dense CRF (consensus.refine = \"crf\"), "
                              "but pydensecrf2 is not installed",
                              fix=f"{crf.INSTALL_HINT}; or annotate without it: --no-crf")
    return ccfg, mcfg, mc_samples or cfg.mc_samples


def annotate(run: str | Path, images: str | Path, out: str | Path, *, batch_size: int = 8,
             mc_samples: int | None = None, num_workers: int | None = None, device: str | None = None,
             consensus: dict[str, Any] | None = None, maps: dict[str, Any] | None = None,
             method: str = "run", segmenter: str | Path | None = None,
             segmenter_min_iou: float = 0.2, labels: bool = False, progress: bool = True) -> AnnotateSummary:
    """Annotate every image under ``images`` with the run's ensemble into ``out`` (resumable).

    ``method="run"`` uses the run's calibrated recipe; ``method="paper"`` the paper's fixed rule (plain
    XGrad-CAM, unanimous intersection at 0.5 of each map's max). ``consensus``/``maps`` override fields.
    With ``segmenter`` (a `pixelvote segment train` folder) masks come from the segmenter; the ensemble still
    gives the diagnosis, the uncertainty and the flags, plus ``segmenter_disagrees`` when the segmenter's
    mask and the consensus mask overlap less than ``segmenter_min_iou`` (IoU).
    With ``labels`` the images' own labels (class folders, or a CSV's ``label`` column) decide whether an
    image gets a mask and of which class; every member's map is fused, and ``label_disagrees`` flags images
    whose diagnosis differs from their label (see :func:`pixelvote.consensus.apply_consensus`)."""
    out = check_out_dir(out)
    opencv()  # writes the files: a broken install is said before any model loads
    ens, cfg = load_run(run, device=device, fold=True)
    ccfg, mcfg, T = resolve_recipe(cfg, method, consensus, maps, mc_samples, labels)
    seg = None
    if segmenter is not None:
        from pixelvote.segment.train import load_segmenter

        seg = (*load_segmenter(segmenter, device=ens.device), segmenter_min_iou)
        from pixelvote.refine import crf

        if seg[1].refines and not crf.available():
            raise ConfigError("this segmenter refines its masks with the dense CRF, but pydensecrf2 is not "
                              "installed", path=Path(segmenter), fix=crf.INSTALL_HINT)
        if seg[1].resize != ens.resize:
            log.warning("the segmenter %s learned from %s inputs but this run makes %s inputs; its masks may "
                        "be worse: train it on this run's annotations", segmenter, seg[1].resize, ens.resize)
    items = list_inputs(images, labels=labels)
    if labels:
        check_labels(items, ens.classes, images)
    with _exclusive(out):
        return _annotate_locked(ens, run, items, out, ccfg, mcfg, T, batch_size, num_workers, progress, seg)


def _annotate_locked(ens: Ensemble, run: str | Path, items: list[Item], out: Path, ccfg: ConsensusConfig,
                     mcfg: MapConfig, T: int, batch_size: int, num_workers: int | None,
                     progress: bool, seg: tuple | None = None) -> AnnotateSummary:
    """The body of :func:`annotate`, run while holding the output folder's lock."""
    pending_at, summary, already_skipped = plan(out, run, ens, items, ccfg, mcfg)
    skipped_path = out / "skipped.jsonl"
    pending = [items[i] for i in pending_at]
    if not pending:
        return _finish(summary, out)
    workers = num_workers if num_workers is not None else default_workers(ens.device)
    loader = torch.utils.data.DataLoader(_Decode(pending, ens.image_size, ens.resize), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate,
                                         prefetch_factor=2 if workers else None,
                                         worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
    writer = _Writer(out)
    writer.start()
    bar = tqdm(total=len(pending), desc="annotating", unit="img", disable=not progress)
    try:
        for batch in loader:
            good = [b for b in batch if "error" not in b]
            for b in batch:
                if "error" in b:
                    log.warning("skipped: %s", b["error"])
                    summary.skipped += 1
                    if str(b["item"].path) not in already_skipped:
                        append_jsonl(skipped_path, {"image": str(b["item"].path), "reason": b["error"]})
            if good:
                _annotate_batch(ens, ccfg, mcfg, T, good, writer, summary, seg)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    _drop_fixed(skipped_path, out)
    return _finish(summary, out)


def plan(out: Path, run: str | Path, ens: Ensemble, items: list[Item], ccfg: ConsensusConfig, mcfg: MapConfig,
         names: list[str] | None = None) -> tuple[list[int], AnnotateSummary, set[str]]:
    """Prepare ``out`` (annotate.json, a repaired manifest); which of ``items`` are still to do.

    ``names[i]`` is how the manifest and skipped.jsonl name ``items[i]`` (default: its resolved path in the
    manifest, its path in skipped.jsonl). Returns the indices to annotate, the summary so far (images already
    done, key clashes skipped) and the names already in skipped.jsonl."""
    done_keys = _prepare_out(out, Path(run), ens, ccfg, mcfg)
    done = set(done_keys.values())
    skipped_path = out / "skipped.jsonl"
    repair_jsonl_tail(skipped_path)
    already_skipped = {str(r.get("image")) for r in read_jsonl(skipped_path)}
    ids = names if names is not None else [str(it.path.resolve()) for it in items]
    shown = names if names is not None else [str(it.path) for it in items]
    pending = [i for i in range(len(items)) if ids[i] not in done]
    summary = AnnotateSummary(out, total=len(items), already_done=len(items) - len(pending))
    for i in pending:
        it = items[i]
        if it.key not in done_keys:
            continue
        # another image, annotated earlier under this key
        reason = (f"{shown[i]}: its output key {it.key!r} is taken by {done_keys[it.key]}, annotated earlier "
                  "into this folder; writing it would overwrite that image's mask. "
                  "Fix: annotate it into another --out")
        log.warning("skipped: %s", reason)
        summary.skipped += 1
        if shown[i] not in already_skipped:
            append_jsonl(skipped_path, {"image": shown[i], "reason": reason})
    return [i for i in pending if items[i].key not in done_keys], summary, already_skipped


def _drop_fixed(skipped_path: Path, out: Path) -> None:
    """Inputs that an earlier run skipped and this one annotated (the file was fixed) leave skipped.jsonl."""
    skipped = list(read_jsonl(skipped_path))
    if not skipped:
        return
    done = {rec.get("image") for rec in read_jsonl(out / "annotations.jsonl")}
    # a name is a path (resolved in the manifest) or, from the Ray engine, a URI (the same in both)
    keep = [r for r in skipped
            if str(r.get("image")) not in done and str(Path(str(r.get("image"))).resolve()) not in done]
    if len(keep) < len(skipped):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        write_bytes_atomic(skipped_path, text.encode("utf-8"))


def _use_segmenter(res: Any, x: torch.Tensor, model: Any, scfg: Any, min_iou: float,
                   crf_cfg: CRFConfig | None = None) -> None:
    """Replace the consensus margin by the segmenter's (probability - threshold) for foreground diagnoses;
    its dense CRF (where the segmenter has one) uses ``crf_cfg``, the run's consensus.crf."""
    from pixelvote.segment.train import predict, refined_margin

    prob = predict(model, x)
    if prob.shape[-2:] != res.margin.shape[-2:]:
        prob = F.interpolate(prob[:, None], size=res.margin.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
    fg = res.foreground
    seg_margin = prob - scfg.threshold
    todo = fg.nonzero().flatten().to(prob.device)
    if scfg.refines and len(todo):  # as evaluate's "segmenter + dense CRF" row; background: no mask anyway
        seg_margin[todo] = refined_margin(prob[todo], x[todo.to(x.device)], scfg, crf_cfg)
    cons = res.margin > 0
    segm = seg_margin > 0
    inter = (cons & segm).flatten(1).sum(1).float()
    union = (cons | segm).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    res.margin = torch.where(fg.view(-1, 1, 1), seg_margin, torch.full_like(seg_margin, -1.0))
    for b in range(len(res.reasons)):
        if bool(fg[b]) and float(iou[b]) < min_iou:
            res.reasons[b].append("segmenter_disagrees")
        if bool(fg[b]) and "empty_mask" in res.reasons[b] and bool(segm[b].any()):
            res.reasons[b].remove("empty_mask")
        elif bool(fg[b]) and not bool(segm[b].any()) and "empty_mask" not in res.reasons[b]:
            res.reasons[b].append("empty_mask")


def _finish(summary: AnnotateSummary, out: Path) -> AnnotateSummary:
    labels: dict[str, int] = {}
    flagged = 0
    for rec in read_jsonl(out / "annotations.jsonl"):
        labels[rec["label"]] = labels.get(rec["label"], 0) + 1
        flagged += bool(rec.get("flagged"))
    summary.labels, summary.flagged = labels, flagged
    return summary


def _annotate_batch(ens: Ensemble, ccfg: ConsensusConfig, mcfg: MapConfig, T: int,
                    batch: list[dict[str, Any]], writer: _Writer, summary: AnnotateSummary,
                    seg: tuple | None = None) -> None:
    for job in batch_results(ens, ccfg, mcfg, T, batch, seg):
        writer.put(job)
        summary.annotated += 1


@torch.no_grad()
def batch_results(ens: Ensemble, ccfg: ConsensusConfig, mcfg: MapConfig, T: int, batch: list[dict[str, Any]],
                  seg: tuple | None = None) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray,
                                                              np.ndarray, np.ndarray]]:
    """Analyse one batch of decoded images (``{"item", "image", "input"}`` each, as :class:`_Decode` gives)
    and yield each image's ``(record, image, mask, heat, unc)``: its manifest record and the full-size arrays
    (mask bool; heat and uncertainty as uint8 levels) that :func:`pixelvote.engine.render.encode_outputs`
    turns into its files. Shared by the local and the Ray engine."""
    x = torch.stack([b["input"] for b in batch])
    classes = ens.classes
    labelled = [b["item"].label for b in batch]
    given = None if None in labelled else torch.tensor([classes.index(str(c)) for c in labelled])
    a = analyze(ens, x, mc_samples=T, seeds=[b["item"].seed for b in batch], maps=mcfg, given=given)
    res = apply_consensus(a, ccfg, ens.background_index)
    if seg is not None:
        _use_segmenter(res, x, *seg, crf_cfg=ccfg.crf)
    # the heat and uncertainty maps only ever become 8-bit pictures: quantised before the resize, which
    # then runs on uint8 (on a CPU, cheaper than a float resize and the float -> uint8 pass at full size)
    levels = to_levels(torch.stack([res.heat.clamp(0, 1), res.uncertainty.clamp(0, 1)], 1))
    for j, b in enumerate(batch):
        item: Item = b["item"]
        image: np.ndarray = b["image"]
        hw = image.shape[:2]
        # as evaluate scores it
        mask = (upsample(crop_content(res.margin[j], hw, ens.resize), hw) > 0).cpu().numpy()
        heat, unc = resize_uint8(crop_content(levels[j], hw, ens.resize).contiguous(), hw).cpu().numpy()
        diagnosis = int(a.label[j])
        label = diagnosis if given is None else int(given[j])
        area = int(mask.sum())
        members = {}
        for mi, name in enumerate(a.member_names):
            st = a.stats[mi]
            ml = int(st["label"][j])
            key = name if name not in members else f"{name}#{mi}"
            members[key] = {
                "label": classes[ml], "probability": round(float(st["mean"][j, ml]), 6),
                "entropy": round(float(st["entropy"][j]), 6),
                "mutual_information": round(float(st["mutual_information"][j]), 6),
                "variance": round(float(st["variance"][j]), 6), "agrees": bool(res.agree[mi, j])}
        reasons = res.reasons[j]
        record = {
            "image": str(item.path.resolve()), "key": item.key,
            **output_paths(item.key), "width": int(hw[1]), "height": int(hw[0]),
            "label": classes[label], "label_index": label, "label_given": given is not None,
            "diagnosis": classes[diagnosis],
            "probability": round(float(a.ensemble_probs[j, label]), 6),
            "probabilities": {c: round(float(a.ensemble_probs[j, k]), 6) for k, c in enumerate(classes)},
            "target_class": classes[int(a.target[j])], "members": members,
            "agreement": round(float(res.agreement[j]), 6), "flagged": bool(reasons), "reasons": reasons,
            "mask_area": area, "mask_fraction": round(area / float(hw[0] * hw[1]), 6),
            "threshold": round(float(res.thresholds[res.agree[:, j], j].mean()) if res.agree[:, j].any()
                               else float(res.thresholds[:, j].mean()), 6),
            "uncertainty_mean": round((float(unc[mask].mean()) if area else float(unc.mean())) / 255.0, 6),
        }
        yield record, image, mask, heat, unc
