"""`pixelvote segment combine`: several trained segmenters as one, their mean probability as its mask."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pixelvote.data.imageio import write_json_atomic
from pixelvote.errors import ConfigError
from pixelvote.models.checkpoint import load_module_state, save_weights
from pixelvote.segment.model import SegmenterEnsemble
from pixelvote.segment.train import (
    SegConfig,
    SegMember,
    build_segmenter,
    calibrate_segmenter,
    read_seg_config,
    refuse_existing_segmenter,
)

log = logging.getLogger(__name__)
MUST_AGREE = ("image_size", "resize", "background", "classes")


def combine_segmenters(folders: list[str | Path], out: str | Path, *, run: str | Path | None = None,
                       crf_iterations: tuple[int, ...] | None = None) -> Path:
    """Save the segmenters of ``folders`` (``segment train --out`` folders) as one segmenter in ``out``
    whose probability is their mean; its thresholds (and its CRF's) are then chosen on ``run``'s validation
    masks, as ``segment train`` chooses them (without a run they stay at 0.5 and the reason is saved)."""
    folders, out = [Path(f) for f in folders], Path(out)
    if len(folders) < 2:
        raise ConfigError("combining needs at least two segmenters",
                          fix="pass two or more `pixelvote segment train --out` folders")
    if out.resolve() in {f.resolve() for f in folders}:
        raise ConfigError(f"--out {out} is one of the segmenters being combined; it would be overwritten",
                          fix="write the combination to a new folder")
    refuse_existing_segmenter(out)
    cfgs = [read_seg_config(f) for f in folders]
    first = cfgs[0]
    for folder, cfg in zip(folders, cfgs, strict=True):
        if cfg.members:
            raise ConfigError(f"{folder} is already a combination of {len(cfg.members)} segmenters",
                              fix="combine the folders it was made of: "
                                  + ", ".join(m.source for m in cfg.members))
        for field in MUST_AGREE:
            if getattr(cfg, field) != getattr(first, field):
                raise ConfigError(
                    f"{folder} was trained with {field} {getattr(cfg, field)!r}, {folders[0]} with "
                    f"{getattr(first, field)!r}; their masks cannot be averaged",
                    fix="combine segmenters trained on the same annotations' classes, at the same "
                        "--image-size")
    members = []
    for folder, cfg in zip(folders, cfgs, strict=True):
        model = build_segmenter(cfg)
        load_module_state(model, folder / "segmenter.safetensors", f"the {cfg.encoder} segmenter")
        members.append(model)
    combined = SegmenterEnsemble(members)
    defaults = SegConfig()
    cfg = first.model_copy(update={
        "members": [SegMember(encoder=c.encoder, pyramid_channels=c.pyramid_channels,
                              segmentation_channels=c.segmentation_channels, flip_tta=c.flip_tta,
                              source=str(f.resolve())) for f, c in zip(folders, cfgs, strict=True)],
        "flip_tta": combined.flip_tta, "crf": all(bool(c.crf) for c in cfgs), "use_crf": None,
        "examples": max(c.examples for c in cfgs),
        "encoder_from": "; ".join(f"{c.encoder}: {c.encoder_from}" for c in cfgs),
        # the members' thresholds were chosen for their own probabilities, not for the mean
        "threshold": defaults.threshold, "crf_threshold": defaults.crf_threshold,
        "crf_iterations": None, "crf_cutoff": defaults.crf_cutoff,
        "threshold_source": defaults.threshold_source,
    })
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "segmenter.safetensors", combined)
    write_json_atomic(out / "segmenter.json", cfg.model_dump(mode="json"))
    log.info("combined %d segmenters into %s", len(members), out)
    calibrate_segmenter(out, run, model=combined.eval(), crf_iterations=crf_iterations)
    return out


def train_combined(annotations: str | Path, out: str | Path, members: int, *, run: str | Path | None = None,
                   cfg: SegConfig | None = None, pretrained: bool = True, device: str | None = None,
                   crf_iterations: tuple[int, ...] | None = None) -> Path:
    """``members`` segmenters on the annotation folder's masks, seeds ``cfg.seed``, ``cfg.seed + 1``, ...,
    each in ``out/member-<i>``, combined into ``out`` (:func:`combine_segmenters`). A member already trained
    there (an earlier, interrupted call) is kept, not trained again; an ``out`` that already holds the
    combination is an error. The records the members were trained without are listed in
    ``out/skipped.jsonl``."""
    from pixelvote.segment.train import annotating_run, skipped_inputs, train_segmenter, write_skipped

    cfg = cfg or SegConfig()
    out = Path(out)
    if members < 2:
        raise ConfigError("a combination needs at least two members", fix="pass --members 2 or more")
    refuse_existing_segmenter(out)
    run = run if run is not None else annotating_run(annotations)
    folders = []
    for i in range(members):
        folder = out / f"member-{i}"
        if (folder / "segmenter.json").exists() and (folder / "segmenter.safetensors").exists():
            log.info("member %d is already trained in %s: kept", i, folder)
        else:
            train_segmenter(annotations, folder, run=run, cfg=cfg.model_copy(update={"seed": cfg.seed + i}),
                            pretrained=pretrained, device=device, calibrate=False)
        folders.append(folder)
    skipped = {json.dumps(r, sort_keys=True): r for f in folders for r in skipped_inputs(f)}
    write_skipped(out, list(skipped.values()))
    return combine_segmenters(folders, out, run=run, crf_iterations=crf_iterations)
