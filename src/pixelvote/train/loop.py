"""Fine-tune each member on image-level labels; save a self-describing, resumable run."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelvote.data.dataset import (
    Dataset,
    Sample,
    compile_pattern,
    load_dataset,
    resolve_background,
    split,
)
from pixelvote.data.imageio import check_out_dir, write_bytes_atomic, write_json_atomic
from pixelvote.errors import CheckpointError, DataError
from pixelvote.models.checkpoint import (
    MemberConfig,
    RunConfig,
    load_member_state,
    member_file,
    save_run_config,
    save_weights,
)
from pixelvote.models.ensemble import resolve_device
from pixelvote.models.member import Member, build_member
from pixelvote.train.cache import CachedSet, cache_samples
from pixelvote.train.config import TrainConfig
from pixelvote.train.optim_state import load_optimizer, save_optimizer

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    dataset: Dataset
    background: str
    train: CachedSet
    val: CachedSet
    masks: CachedSet | None = None  # the images whose masks calibration scores (default: val's)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, run_dir: Path) -> Prepared:
    ds = load_dataset(cfg.data, group_pattern=cfg.group_pattern)
    background = resolve_background(ds.classes, cfg.background)
    if ds.val:
        train_s, val_s = ds.samples, ds.val
    else:
        train_s, val_s = split(ds.samples, cfg.val_fraction, cfg.seed)
    warn_one_class_source(ds.samples, cfg)
    excluded = []
    if cfg.train_exclude:
        pattern = compile_pattern(cfg.train_exclude, "--train-exclude")
        excluded = [s for s in train_s if pattern.search(s.path.name)]
        train_s = [s for s in train_s if not pattern.search(s.path.name)]
        log.info("--train-exclude %r: %d training image(s) left out", cfg.train_exclude, len(excluded))
    warn_aspect_shortcut(train_s, cfg)
    train = cache_samples(train_s, ds.classes, cfg.image_size, desc="reading training images",
                          with_masks=False, resize=cfg.resize)
    val = cache_samples(val_s, ds.classes, cfg.image_size, desc="reading validation images",
                        resize=cfg.resize, full_masks=True)
    chosen = {s.path for s in calibration_samples(val.samples, excluded, cfg)}
    extra = [s for s in excluded if s.path in chosen]
    masks: CachedSet | None = None  # the validation split's own, as they are (and seeded as before)
    if extra or any(s.mask is not None and s.path not in chosen for s in val.samples):
        masks = val.subset([i for i, s in enumerate(val.samples) if s.path in chosen])
        if extra:
            masks = masks.concat(cache_samples(extra, ds.classes, cfg.image_size, resize=cfg.resize,
                                               desc="reading kept-out images with masks", full_masks=True))
    scored = val.samples if masks is None else masks.samples
    write_json_atomic(run_dir / "split.json", {
        "train": [str(s.path.resolve()) for s in train_s], "val": [str(s.path.resolve()) for s in val_s],
        "test": [str(s.path.resolve()) for s in ds.test],
        "excluded_from_training": [str(s.path.resolve()) for s in excluded],
        "calibration_masks": [str(s.path.resolve()) for s in scored if s.mask is not None]})
    skipped = ds.problems + train.skipped + val.skipped + (masks.skipped if masks is not None else [])
    problems = [{"image": p, "reason": r} for p, r in skipped]
    if problems:
        write_bytes_atomic(run_dir / "skipped.jsonl",
                           "".join(json.dumps(p) + "\n" for p in problems).encode())
        log.warning("%d input(s) skipped; see %s", len(problems), run_dir / "skipped.jsonl")
    else:
        (run_dir / "skipped.jsonl").unlink(missing_ok=True)  # inputs fixed since an earlier attempt
    counts = torch.bincount(train.labels, minlength=len(ds.classes)).tolist()
    empty = [c for c, n in zip(ds.classes, counts, strict=True) if n == 0]
    if empty:
        raise DataError(f"no usable training images for class(es) {empty}", path=cfg.data,
                        fix="add images to those class folders (or remove the folders)"
                            + (f", or loosen --train-exclude {cfg.train_exclude!r}"
                               if cfg.train_exclude else ""))
    if len(val) == 0:
        raise DataError("the validation split holds no usable images", path=cfg.data,
                        fix="add images, lower --val-fraction's granularity, or provide a val/ folder")
    return Prepared(ds, background, train, val, masks)


def calibration_samples(val: list[Sample], excluded: list[Sample], cfg: TrainConfig) -> list[Sample]:
    """The images whose masks calibration scores: the validation images with a mask and, with
    ``cfg.calibrate_excluded``, those kept out of training that have one; with a ``cfg.group_pattern`` at most
    ``cfg.calibration_per_group`` of each group, evenly spaced in name order (a video's frames: consecutive
    ones are near-duplicates)."""
    pool = [s for s in [*val, *(excluded if cfg.calibrate_excluded else [])] if s.mask is not None]
    n = cfg.calibration_per_group
    if not (cfg.group_pattern and n):
        return pool
    groups: dict[str, list[Sample]] = {}
    for s in pool:
        groups.setdefault(s.group, []).append(s)
    out: list[Sample] = []
    for members in groups.values():
        members = sorted(members, key=lambda s: s.path.name)
        if len(members) > n:
            members = [members[round(i * (len(members) - 1) / max(1, n - 1))] for i in range(n)]
        out += members
    return out


def warn_one_class_source(samples: list, cfg: TrainConfig) -> str | None:
    """Warn when every image that --group-pattern matches (the frames of videos, say) has one class while
    other classes exist: a source only one class has, which classifiers learn instead of the finding."""
    if not cfg.group_pattern or cfg.train_exclude:
        return None
    pattern = compile_pattern(cfg.group_pattern)
    matched = [s for s in samples if pattern.search(s.path.name)]
    classes = {s.label for s in matched}
    if len(matched) < 2 or len(classes) != 1 or len(classes | {s.label for s in samples}) < 2:
        return None
    label = next(iter(classes))
    message = (f"all {len(matched)} images whose names match --group-pattern '{cfg.group_pattern}' are "
               f"{label!r}: a source only one class has, which the classifiers can learn instead of the "
               "finding. "
               f"Consider --train-exclude '{cfg.group_pattern}' (they stay in validation; annotate them with "
               "--labels)")
    log.warning(message)
    return message


def warn_aspect_shortcut(samples: list, cfg: TrainConfig) -> str | None:
    """With ``--resize letterbox`` the padding shows each image's aspect ratio: warn when square vs not square
    alone tells most training images' classes apart (fire: 219 of 222 fire photos are not square, 174 of 181
    fire-free images are), since the classifiers then learn the padding instead of the finding."""
    if cfg.resize != "letterbox" or not samples:
        return None
    from collections import Counter

    from pixelvote.data.imageio import image_size

    groups: dict[bool, Counter] = {True: Counter(), False: Counter()}
    for s in samples:
        try:
            w, h = image_size(s.path)
        except DataError:
            continue  # reported when the images are read
        groups[abs(w - h) <= 0.02 * max(w, h)][s.label] += 1
    total = sum(sum(c.values()) for c in groups.values())
    if not total or not all(groups.values()):
        return None
    by_shape = sum(c.most_common(1)[0][1] for c in groups.values()) / total
    overall = (groups[True] + groups[False]).most_common(1)[0][1] / total
    if by_shape < 0.9 or by_shape - overall < 0.2:
        return None
    sq, other = (groups[k].most_common(1)[0][0] for k in (True, False))
    message = (f"--resize letterbox: whether an image is square alone tells {by_shape:.0%} of the training "
               f"images' classes apart (square: mostly {sq!r}, not square: mostly {other!r}); the padding "
               "shows it, so the classifiers can learn the shape instead of the finding. Use --resize squash")
    log.warning(message)
    return message


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, data: CachedSet, size: int, kind: str = "standard") -> None:
        from pixelvote.data.transforms import train_augment

        self.data = data
        self.aug = train_augment(size, kind)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aug(self.data.images[i]), self.data.labels[i]


def _loss(member: Member, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
          cfg: TrainConfig) -> torch.Tensor:
    pooled = member.pool(member.features(x))
    logits = member.fc(member.dropout(pooled))
    loss = F.cross_entropy(logits, y, weight=weight)
    if cfg.mc_variance_weight > 0 and member.p > 0:
        extra = [logits] + [member.fc(member.dropout(pooled)) for _ in range(cfg.mc_train_samples - 1)]
        probs = torch.stack([torch.softmax(z, -1) for z in extra])
        loss = loss + cfg.mc_variance_weight * probs.var(0, unbiased=False).sum(-1).mean()
    return loss


@torch.no_grad()
def evaluate_member(member: Member, val: CachedSet, normalize, batch_size: int,
                    weight: torch.Tensor) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    member.eval()
    total, correct, n = 0.0, 0, 0
    dev = weight.device
    for i in range(0, len(val), batch_size):
        x = normalize(val.images[i:i + batch_size])
        y = val.labels[i:i + batch_size].to(dev)
        logits = member(x)
        total += float(F.cross_entropy(logits, y, weight=weight, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    return total / max(n, 1), correct / max(n, 1)


def _class_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k).float().clamp_min(1.0)
    return counts.sum() / (k * counts)


def saved_config(path: Path) -> TrainConfig:
    """The settings a run was started with (``RUN/train_config.json``), for ``--resume``."""
    from pydantic import ValidationError

    try:
        return TrainConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the run's saved settings are corrupt ({str(exc).splitlines()[0]})", path=path,
                              fix="start a new run with another --out (or delete this run folder first)"
                              ) from None


def _saved_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):  # not JSON
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("members"), dict):
        raise CheckpointError("the training checkpoint's commit record is corrupt", path=path,
                              fix="start a new run with another --out (or delete this run folder first)")
    return state


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train the ensemble described by ``cfg`` into ``cfg.out``; returns the run folder."""
    run_dir = Path(cfg.out)
    state_path = run_dir / "checkpoint" / "state.json"
    if resume:
        saved = run_dir / "train_config.json"
        if not saved.exists():
            raise CheckpointError("nothing to resume: no train_config.json", path=run_dir,
                                  fix="start a new run without --resume")
        cfg = saved_config(saved)
    elif state_path.exists() or (run_dir / "run.json").exists():
        raise CheckpointError("a run already exists here", path=run_dir,
                              fix="pass --resume to continue it, or choose another --out")
    device = resolve_device(cfg.device)
    check_out_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "train_config.json", cfg.model_dump(mode="json"))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    names = cfg.model_names()
    seed_everything(cfg.seed)
    data = prepare_data(cfg, run_dir)
    classes = data.dataset.classes
    state = _saved_state(state_path) if state_path.exists() else {"members": {}}
    if resume and (run_dir / "run.json").exists():
        from pixelvote.models.checkpoint import read_run_config

        before = read_run_config(run_dir).classes
        if before != classes:
            raise CheckpointError(f"the run was started with classes {before} but the data now has {classes}",
                                  path=run_dir, fix="restore the data's class folders, or start a new run")
    history_path = run_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    # state.json is the commit point: drop log rows of an epoch whose checkpoint was never committed
    done_epochs = {k.split("_", 1)[1]: v["epoch"] for k, v in state["members"].items()}
    history = [h for h in history if h["epoch"] <= done_epochs.get(h["member"], 0)]

    from pixelvote.models.ensemble import Ensemble

    norm = Ensemble([], classes, data.background, cfg.image_size, device=device).normalize
    weight = _class_weights(data.train.labels, len(classes)).to(device)
    run_cfg = RunConfig(classes=classes, background=data.background, image_size=cfg.image_size,
                        resize=cfg.resize, members=[], seed=cfg.seed, mc_samples=cfg.mc_samples,
                        train=cfg.model_dump(mode="json", exclude={"data", "out"}),
                        data={"root": str(Path(cfg.data).resolve()), "train_images": len(data.train),
                              "val_images": len(data.val), "class_counts": data.dataset.counts()})
    done_members: list[MemberConfig] = []
    for i, name in enumerate(names):
        key = f"{i}_{name}"
        mstate = state["members"].setdefault(key, {"epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0,
                                                    "done": False})
        mcfg = MemberConfig(name=name, dropout=cfg.dropout, cam_layer=cfg.cam_layer,
                            file=member_file(i, name))
        if not mstate["done"]:
            _train_member(i, name, mcfg, mstate, cfg, data, run_dir, device, norm, weight, state, history,
                          lambda mcfg=mcfg: _write_partial(run_cfg, done_members, mcfg, run_dir))
        done_members.append(mcfg)
        run_cfg.members = list(done_members)
        save_run_config(run_dir, run_cfg)

    from pixelvote.train.calibrate import calibrate

    cal = calibrate(run_dir, data.val, cfg, data.train, data.masks)
    run_cfg.consensus, run_cfg.maps = cal.consensus, cal.maps
    run_cfg.decision_threshold, run_cfg.decision_evidence = cal.decision_threshold, cal.decision_evidence
    run_cfg.best, run_cfg.labelled = cal.recipes.get("best"), cal.recipes.get("labelled")
    save_run_config(run_dir, run_cfg)
    return run_dir


def _write_partial(run_cfg: RunConfig, done: list[MemberConfig], current: MemberConfig,
                   run_dir: Path) -> None:
    """Keep run.json loadable while training: it lists the members that have weights so far."""
    run_cfg.members = [*done, current]
    save_run_config(run_dir, run_cfg)


def _train_member(i: int, name: str, mcfg: MemberConfig, mstate: dict, cfg: TrainConfig, data: Prepared,
                  run_dir: Path, device: torch.device, norm, weight: torch.Tensor, state: dict,
                  history: list, on_first_save) -> None:  # type: ignore[no-untyped-def]
    key = f"{i}_{name}"
    ckpt_dir = run_dir / "checkpoint"
    seed_everything(cfg.seed * 1000 + i)
    member = build_member(name, len(data.dataset.classes), dropout=cfg.dropout, pretrained=cfg.pretrained,
                          weights_dir=cfg.weights_dir, cam_layer=cfg.cam_layer).to(device)
    head = list(member.fc.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in member.parameters() if id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr},
                             {"params": head, "lr": cfg.lr * cfg.head_lr_multiplier}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    start = int(mstate["epoch"])
    if start > 0:
        tag = f"{key}.e{start}" if (ckpt_dir / f"{key}.e{start}.safetensors").exists() else key  # older runs
        load_member_state(member, ckpt_dir / f"{tag}.safetensors")
        load_optimizer(opt, ckpt_dir / f"{tag}.optim.safetensors")
        if "scheduler" in mstate:
            sched.load_state_dict(mstate["scheduler"])
        else:  # a checkpoint from before the schedule was saved: put the cosine schedule at `start`
            sched.last_epoch = start
            for g, base in zip(opt.param_groups, sched.base_lrs, strict=True):
                g["lr"] = base * 0.5 * (1 + math.cos(math.pi * start / cfg.epochs))
        log.info("%s: resuming after epoch %d", name, start)
    ds = _Augmented(data.train, cfg.image_size, cfg.augment)
    bar = tqdm(range(start, cfg.epochs), desc=f"training {name}", unit="epoch", initial=start,
               total=cfg.epochs)
    for epoch in bar:
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + i * 1009 + epoch)
        torch.manual_seed(cfg.seed * 7919 + i * 104_729 + epoch)  # augmentation + dropout draws
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                             drop_last=len(ds) > cfg.batch_size)
        member.train()
        total, n = 0.0, 0
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False):
            x, y = norm(x), y.to(device)
            loss = _loss(member, x, y, weight, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        sched.step()
        val_loss, val_acc = evaluate_member(member, data.val, norm, cfg.batch_size * 2, weight)
        improved = val_loss < mstate["best_val_loss"] - 1e-6
        if improved:
            mstate["best_val_loss"], mstate["bad_epochs"] = val_loss, 0
            save_weights(run_dir / mcfg.file, member)
            if epoch == start or not (run_dir / "run.json").exists():
                on_first_save()
        else:
            mstate["bad_epochs"] += 1
        mstate["epoch"] = epoch + 1
        mstate["scheduler"] = sched.state_dict()
        stop = mstate["bad_epochs"] >= cfg.patience
        mstate["done"] = stop or epoch + 1 >= cfg.epochs
        record = {"member": name, "epoch": epoch + 1, "train_loss": total / max(n, 1), "val_loss": val_loss,
                  "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"],
                  "seconds": round(time.time() - t0, 2), "best": improved}
        history.append(record)
        log.info("%s epoch %d: train loss %.4f, val loss %.4f, val acc %.3f", name, epoch + 1,
                 record["train_loss"], val_loss, val_acc)
        bar.set_postfix(train_loss=f"{record['train_loss']:.3f}", val_loss=f"{val_loss:.3f}",
                        val_acc=f"{val_acc:.3f}")
        # the last state, written atomically, so Ctrl-C or a kill loses at most the running epoch
        # weights and optimiser go to per-epoch files, then state.json names the epoch (the commit point):
        # a kill at any moment resumes from a consistent epoch
        save_weights(ckpt_dir / f"{key}.e{epoch + 1}.safetensors", member)
        save_optimizer(opt, ckpt_dir / f"{key}.e{epoch + 1}.optim.safetensors")
        write_json_atomic(run_dir / "history.json", history)
        write_json_atomic(ckpt_dir / "state.json", state)
        for old in (f"{key}.e{epoch}.safetensors", f"{key}.e{epoch}.optim.safetensors"):
            (ckpt_dir / old).unlink(missing_ok=True)
        if stop:
            log.info("%s: early stop after epoch %d (no better validation loss for %d epochs)", name,
                     epoch + 1, cfg.patience)
            break
    bar.close()
