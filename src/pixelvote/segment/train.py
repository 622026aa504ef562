"""`pixelvote segment train`: fit the segmenter on pseudo-masks (+ reviewed masks), save SEGRUN."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from pixelvote.data.imageio import check_out_dir, read_jsonl, write_bytes_atomic, write_json_atomic
from pixelvote.errors import CheckpointError, ConfigError, DataError
from pixelvote.models.checkpoint import load_module_state, save_weights
from pixelvote.models.ensemble import resolve_device
from pixelvote.refine.crf import CRFConfig
from pixelvote.segment.data import SegDataset, select_examples
from pixelvote.segment.model import Segmenter, SegmenterEnsemble

log = logging.getLogger(__name__)
SEG_FORMAT = 1


DECODERS = {"light": (64, 32), "full": (256, 128)}  # FPN (pyramid, segmentation) channels; full = smp's


def segmenter_size(image_size: int) -> int:
    """The segmenter input size nearest to ``image_size`` that its FPN takes (a multiple of 32)."""
    return max(64, round(image_size / 32) * 32)


def decoder_settings(name: str) -> dict[str, int]:
    """``--seg-decoder light|full`` as SegConfig fields."""
    if name not in DECODERS:
        from pixelvote.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown segmenter decoder: {did_you_mean(name, list(DECODERS))}")
    pyramid, segmentation = DECODERS[name]
    return {"pyramid_channels": pyramid, "segmentation_channels": segmentation}


class SegMember(BaseModel):
    """One segmenter of a combination (`segment combine`): its network, and the folder it came from."""
    model_config = ConfigDict(extra="forbid")
    encoder: str
    pyramid_channels: int
    segmentation_channels: int
    flip_tta: bool = False
    source: str = ""


class SegConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = SEG_FORMAT
    encoder: str = "efficientnet_lite0"
    image_size: int = Field(224, ge=64, multiple_of=32, description="a multiple of 32 (the FPN's encoder "
                            "halves the image five times), at least 64 (at 32 its coarsest level is one "
                            "pixel, which its group norms cannot normalise: one image alone fails)")
    epochs: int = Field(30, ge=1,
                        description="BUSI validation lesions: 0.271 mean IoU after 30, 0.255 after 12")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-4, gt=0)
    mode: str = "confident"
    reviewed_weight: float = 3.0
    seed: int = 0
    threshold: float = Field(0.5, gt=0, lt=1, description="the mask is where the probability exceeds it")
    crf_threshold: float = Field(0.5, gt=0, lt=1, description="the probability the dense CRF's unary counts "
                                 "as undecided (its mask is where the refined probability exceeds "
                                 "`crf_cutoff`)")
    crf_iterations: int | None = Field(None, ge=1, le=50, description="mean-field iterations of its dense "
                                       "CRF (None: the run's consensus.crf.iterations); chosen on validation")
    crf_cutoff: float = Field(0.5, gt=0, lt=1, description="the CRF-refined mask is where the refined "
                              "probability exceeds it; chosen on validation")
    threshold_source: str = Field("default", description="how the thresholds were set (written by training: "
                                  "chosen on the run's validation masks, see calibration.json)")
    pyramid_channels: int = Field(64, ge=8, description="FPN decoder width (smp's default is 256)")
    segmentation_channels: int = Field(32, ge=8, description="FPN head width (smp's default is 128)")
    flip_tta: bool = Field(False, description="average with the flipped image's prediction (2x the cost)")
    augment: bool = Field(False, description="random crops, flips, small rotations and brightness/contrast "
                          "jitter while training (else horizontal flips only)")
    encoder_init: Literal["run", "imagenet"] = Field(
        "run", description="run: start the encoder from the run's fine-tuned member of the same network (it "
        "already tells the findings apart; ImageNet weights where the run has none); imagenet: ImageNet "
        "weights")
    encoder_from: str = Field("", description="where the encoder's initial weights came from (written by "
                                              "training)")
    crf: bool | None = Field(None, description="annotate refines the probability with the dense CRF (at "
                             "`threshold`) before taking the mask (the `segmenter + dense CRF` row of "
                             "`evaluate --segmenter`); None: on where pydensecrf2 is installed (decided when "
                             "training)")
    use_crf: bool | None = Field(None, description="whether annotate takes the CRF-refined mask (where `crf` "
                                 "allows it) or the thresholded probability: the better of the two on the "
                                 "run's validation masks (written by calibration; None: as `crf`)")
    resize: Literal["squash", "letterbox"] = Field(
        "squash", description="how images become the square input: as the ensemble that annotated the "
                              "training folder does it (set by training from annotate.json, or from --run)")
    background: str = ""
    classes: list[str] = Field(default_factory=list)
    examples: int = 0
    members: list[SegMember] = Field(default_factory=list, description="the segmenters whose mean "
                                     "probability this one is (`segment combine`); empty: one segmenter")

    def crf_settings(self, run_crf: CRFConfig) -> CRFConfig:
        """The run's dense-CRF settings (``consensus.crf``) with this segmenter's iterations."""
        if self.crf_iterations is None:
            return run_crf
        return run_crf.model_copy(update={"iterations": self.crf_iterations})

    @property
    def refines(self) -> bool:
        """Whether annotate refines the segmenter's probability with the dense CRF."""
        return bool(self.crf) and self.use_crf is not False


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp_min(1.0)
    p = torch.sigmoid(logits) * (weight > 0)
    t = target * (weight > 0)
    inter = (p * t).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    has_fg = t.flatten(1).sum(1) > 0
    return bce + (dice[has_fg].mean() if has_fg.any() else 0.0 * bce)


def train_segmenter(annotations: str | Path, out: str | Path, *, run: str | Path | None = None,
                    cfg: SegConfig | None = None, pretrained: bool = True, device: str | None = None,
                    calibrate: bool = True, crf_iterations: tuple[int, ...] | None = None) -> Path:
    """Fit the segmenter on the annotation folder's masks and save it to ``out``; with ``calibrate``, its
    thresholds are then chosen on the validation masks of the run (``run``, or the run that annotated the
    folder), see :func:`calibrate_segmenter`. Records whose image or mask cannot be used are left out and
    listed in ``out/skipped.jsonl`` (see :func:`skipped_inputs`). An ``out`` that already holds a segmenter
    is an error, not overwritten."""
    cfg = (cfg or SegConfig()).model_copy()
    annotations, out = Path(annotations), Path(out)
    refuse_existing_segmenter(out)
    meta_path = annotations / "annotate.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    cfg.background = meta.get("background") or cfg.background
    cfg.classes = meta.get("classes") or cfg.classes
    if run is not None and (not cfg.background or "resize" not in meta):
        from pixelvote.models.checkpoint import read_run_config

        rc = read_run_config(run)
        cfg.background, cfg.classes = cfg.background or rc.background, cfg.classes or rc.classes
        meta.setdefault("resize", rc.resize)
    cfg.resize = meta.get("resize", "squash")
    skipped: list[dict] = []
    examples = select_examples(annotations, background=cfg.background, mode=cfg.mode,
                               reviewed_weight=cfg.reviewed_weight, skipped=skipped)
    cfg.examples = len(examples)
    from pixelvote.refine import crf

    if cfg.crf is None:  # with the encoder from the run's member: +1.6 / -0.1 IoU points on BUSI, +24 on fire
        cfg.crf = crf.available()
        if not cfg.crf:
            log.info("the segmenter's masks will not be CRF-refined (pydensecrf2 is not installed; %s)",
                     crf.INSTALL_HINT)
    elif cfg.crf and not crf.available():
        raise ConfigError("--crf needs pydensecrf2, which is not installed", fix=crf.INSTALL_HINT)
    run = run if run is not None else annotating_run(annotations)
    init = _initial_encoder(cfg, run, pretrained)
    dev = resolve_device(device)
    ds = SegDataset(examples, cfg.image_size, augment=cfg.augment, resize=cfg.resize)
    out.mkdir(parents=True, exist_ok=True)
    write_skipped(out, skipped)
    history: list[dict] = []
    model = _fit(ds, cfg, dev, pretrained and init is None, history, init=init)
    save_weights(out / "segmenter.safetensors", model)
    write_json_atomic(out / "history.json", history)
    write_json_atomic(out / "segmenter.json", cfg.model_dump(mode="json"))
    if calibrate:
        calibrate_segmenter(out, run, model=model.eval(), crf_iterations=crf_iterations)
    return out


def calibrate_segmenter(segrun: str | Path, run: str | Path | None, *,
                        model: Segmenter | SegmenterEnsemble | None = None,
                        device: str | None = None, crf_iterations: tuple[int, ...] | None = None) -> dict:
    """Choose the segmenter's ``threshold``, and its dense CRF's ``crf_threshold``, ``crf_iterations``
    (among ``crf_iterations``, default :data:`~pixelvote.segment.calibrate.CRF_ITERATIONS`, and the run's
    own) and ``crf_cutoff``, by the mean IoU they give on ``run``'s validation images that show a finding
    and have a mask (the CRF otherwise with the run's ``consensus.crf``), and save them into ``segrun``'s
    segmenter.json, with every threshold's IoU in calibration.json. Without a run, or validation masks, the
    thresholds stay as they are and the reason is saved instead."""
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.segment.calibrate import CRF_ITERATIONS, choose_thresholds

    segrun = Path(segrun)
    if model is None:
        model, cfg = load_segmenter(segrun, device=device)
    else:
        cfg = SegConfig.model_validate_json((segrun / "segmenter.json").read_text())
    summary: dict = {"images": 0}
    if run is None:
        reason = "no run to take validation masks from (pass --run)"
    else:
        try:
            crf_cfg = read_run_config(run).consensus.crf if cfg.crf else None
            summary = choose_thresholds(model, run, image_size=cfg.image_size, resize=cfg.resize,
                                        crf_cfg=crf_cfg, crf_iterations=crf_iterations or CRF_ITERATIONS)
            reason = "the run's validation images have no masks"
        except (DataError, CheckpointError) as exc:
            reason = f"the run's validation images cannot be read ({exc})"
    if summary.get("threshold") is not None:
        cfg.threshold = summary["threshold"]
        cfg.crf_threshold = summary.get("crf_threshold") or cfg.crf_threshold
        if summary.get("crf_iterations") is not None:
            cfg.crf_iterations, cfg.crf_cutoff = summary["crf_iterations"], summary["crf_cutoff"]
        cfg.threshold_source = (f"validation masks of {Path(str(run)).resolve()}: best mean IoU on "
                                f"{summary['images']} images")
        if summary.get("crf_threshold") is not None:
            # the CRF only where it beats the plain mask: a segmenter trained on CRF-refined masks may
            # already follow the edges, and then the CRF costs time and IoU
            cfg.use_crf = summary["crf_threshold_iou"] > summary["threshold_iou"]
            summary["mask"] = "crf" if cfg.use_crf else "plain"
        crf_part = ""
        if summary.get("crf_threshold") is not None:
            crf_part = (f", CRF {cfg.crf_threshold:.2f} after {cfg.crf_iterations} iterations, cut at "
                        f"{cfg.crf_cutoff:g} (IoU {summary['crf_threshold_iou']:.3f}); annotate takes the "
                        f"{'CRF-refined' if cfg.use_crf else 'plain'} mask")
        log.info("segmenter thresholds chosen on %d validation masks: %.2f (IoU %.3f)%s", summary["images"],
                 cfg.threshold, summary["threshold_iou"], crf_part)
    else:
        cfg.threshold_source = f"kept ({reason})"
        log.warning("the segmenter's thresholds stay %.2f / %.2f: %s", cfg.threshold, cfg.crf_threshold,
                    reason)
    summary["source"] = cfg.threshold_source
    write_json_atomic(segrun / "calibration.json", summary)
    write_json_atomic(segrun / "segmenter.json", cfg.model_dump(mode="json"))
    return summary


def refuse_existing_segmenter(out: Path, option: str = "--out") -> None:
    """``out`` must be a folder (new or existing) that holds no segmenter yet: one is never overwritten."""
    check_out_dir(out, option)
    if (out / "segmenter.json").exists():
        raise CheckpointError("a segmenter already exists here", path=out,
                              fix=f"choose another {option}, or delete this folder first")


def write_skipped(out: Path, skipped: list[dict]) -> None:
    """``out/skipped.jsonl``: the annotation records left out of training, one a line (none: no file)."""
    path = out / "skipped.jsonl"
    if skipped:
        write_bytes_atomic(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped).encode())
        log.warning("%d record(s) skipped; see %s", len(skipped), path)
    else:
        path.unlink(missing_ok=True)  # inputs fixed since an earlier, interrupted attempt


def skipped_inputs(segrun: str | Path) -> list[dict]:
    """The annotation records a segmenter was trained without (its ``skipped.jsonl``; [] when none)."""
    return list(read_jsonl(Path(segrun) / "skipped.jsonl"))


def annotating_run(annotations: str | Path) -> Path | None:
    """The run that annotated the folder (its annotate.json), when it is still there."""
    meta_path = Path(annotations) / "annotate.json"
    annotated_by = json.loads(meta_path.read_text()).get("run") if meta_path.exists() else None
    if not annotated_by:
        return None
    if (Path(annotated_by) / "run.json").exists():
        return Path(annotated_by)
    log.warning("the run that made %s (%s) is gone: the segmenter can neither start from its members nor "
                "choose its thresholds on its validation masks; pass --run", annotations, annotated_by)
    return None


def _initial_encoder(cfg: SegConfig, run: str | Path | None,
                     pretrained: bool) -> dict[str, torch.Tensor] | None:
    """The encoder's starting weights when they come from a run's member (else None: ImageNet or random);
    records where they came from in ``cfg.encoder_from``."""
    init = None
    if cfg.encoder_init == "run":
        from pixelvote.segment.model import encoder_from_run

        init = encoder_from_run(run, cfg.encoder) if run is not None else None
    cfg.encoder_from = (f"member {init[0]} of {Path(run).resolve()}" if init and run is not None
                        else "ImageNet" if pretrained else "random")
    log.info("segmenter encoder starts from %s", cfg.encoder_from)
    return init[1] if init else None


def _fit(ds: SegDataset, cfg: SegConfig, dev: torch.device, pretrained: bool, history: list[dict],
         init: dict[str, torch.Tensor] | None = None) -> Segmenter:
    """A fresh segmenter (encoder from ``init`` when given) trained on ``ds`` for ``cfg.epochs``; appends one
    entry per epoch to ``history``."""
    torch.manual_seed(cfg.seed)
    model = Segmenter(cfg.encoder, pretrained=pretrained, pyramid_channels=cfg.pyramid_channels,
                      segmentation_channels=cfg.segmentation_channels, flip_tta=cfg.flip_tta)
    if init is not None:
        model.load_encoder(init)
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in tqdm(range(cfg.epochs), desc="training segmenter", unit="epoch"):
        t0 = time.time()
        model.train()
        total, n = 0.0, 0
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=g)
        for x, target, weight in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch"):
            x = x.to(dev).float().div_(255.0)
            target, weight = target.to(dev), weight.to(dev)
            if not cfg.augment and torch.rand(()) < 0.5:  # horizontal flip of the whole batch
                x, target, weight = x.flip(-1), target.flip(-1), weight.flip(-1)
            loss = _loss(model(x), target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
        sched.step()
        history.append({"epoch": epoch + 1, "loss": total / max(n, 1), "seconds": round(time.time() - t0, 2)})
        log.info("segmenter epoch %d: loss %.4f", epoch + 1, total / max(n, 1))
    return model


def read_seg_config(segrun: str | Path) -> SegConfig:
    """A segmenter folder's segmenter.json; a clear error for a folder that is not one."""
    segrun = Path(segrun)
    path = segrun / "segmenter.json"
    if not path.exists():
        raise CheckpointError("not a segmenter run (no segmenter.json)", path=segrun,
                              fix="pass the --out folder of `pixelvote segment train`")
    try:
        raw = json.loads(path.read_text())
        for key, old in (("pyramid_channels", 256), ("segmentation_channels", 128), ("flip_tta", True)):
            raw.setdefault(key, old)  # segmenters saved before these settings existed
        cfg = SegConfig.model_validate(raw)
    except Exception as exc:
        raise CheckpointError(f"segmenter.json is invalid ({exc})", path=path,
                              fix="re-train the segmenter") from None
    if cfg.format_version > SEG_FORMAT:
        raise CheckpointError("segmenter written by a newer pixelvote", path=path, fix="upgrade pixelvote")
    return cfg


def build_segmenter(cfg: SegConfig) -> Segmenter | SegmenterEnsemble:
    """The untrained network ``cfg`` describes: one segmenter, or the combination of its ``members``."""
    if not cfg.members:
        return Segmenter(cfg.encoder, pretrained=False, pyramid_channels=cfg.pyramid_channels,
                         segmentation_channels=cfg.segmentation_channels, flip_tta=cfg.flip_tta)
    return SegmenterEnsemble([Segmenter(m.encoder, pretrained=False, pyramid_channels=m.pyramid_channels,
                                        segmentation_channels=m.segmentation_channels, flip_tta=m.flip_tta)
                              for m in cfg.members])


def load_segmenter(segrun: str | Path, device: str | torch.device | None = None,
                   ) -> tuple[Segmenter | SegmenterEnsemble, SegConfig]:
    segrun = Path(segrun)
    cfg = read_seg_config(segrun)
    model = build_segmenter(cfg)
    what = (f"the combination of {len(cfg.members)} segmenters" if cfg.members
            else f"the {cfg.encoder} segmenter")
    load_module_state(model, segrun / "segmenter.safetensors", what)
    from pixelvote.models.fold import fold_batchnorm

    model.eval()
    # inference only
    example = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    for seg in (model.members if isinstance(model, SegmenterEnsemble) else [model]):
        seg.net, _ = fold_batchnorm(seg.net, example)
    model.input_size = cfg.image_size
    dev = resolve_device(device)
    return model.to(dev).to(memory_format=torch.channels_last).eval(), cfg


@torch.no_grad()
def predict(model: Segmenter | SegmenterEnsemble, images: torch.Tensor) -> torch.Tensor:
    """Foreground probability ``(B, S, S)`` for uint8 images ``(B, 3, S, S)`` (flip-averaged if the
    segmenter was trained with ``flip_tta``). Images of another size than the segmenter was trained at (an
    ensemble's input, say) are resized to it, and the probability back to theirs."""
    dev = next(model.parameters()).device
    x = images.to(dev).float().div_(255.0)
    size = tuple(x.shape[-2:])
    trained = getattr(model, "input_size", None)
    if trained and size != (trained, trained):
        x = F.interpolate(x, size=(trained, trained), mode="bilinear", antialias=True, align_corners=False)
    x = x.contiguous(memory_format=torch.channels_last)
    prob = torch.sigmoid(model(x))
    if getattr(model, "flip_tta", False):
        prob = 0.5 * (prob + torch.sigmoid(model(x.flip(-1))).flip(-1))
    if tuple(prob.shape[-2:]) != size:
        prob = F.interpolate(prob[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return prob


def refined_margin(prob: torch.Tensor, images: torch.Tensor, scfg: SegConfig,
                   run_crf: CRFConfig) -> torch.Tensor:
    """The segmenter's probability ``prob (B, S, S)`` refined by its dense CRF, as ``(B, S, S)`` margins
    (> 0: mask): the run's CRF settings with the segmenter's iterations, its ``crf_threshold`` as the
    unary's undecided probability and its ``crf_cutoff`` on the refined probability."""
    from pixelvote.refine.crf import dense_crf

    q = dense_crf(prob, images, scfg.crf_settings(run_crf), threshold=scfg.crf_threshold)
    return q - scfg.crf_cutoff


def reviewed_count(annotations: str | Path) -> int:
    return sum(1 for r in read_jsonl(Path(annotations) / "annotations.jsonl") if r.get("reviewed"))
