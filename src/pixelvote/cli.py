"""The `pixelvote` command: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pixelvote.errors import PixelvoteError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Pixel-level annotations from image-level labels: train an ensemble, annotate, "
                       "review.")
log = logging.getLogger("pixelvote")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


# an example of each list option, for the fix of a value that does not parse
LIST_EXAMPLES = {"--crf-weights": "10,30", "--crf-cutoffs": "0.3,0.5", "--crf-sizes": "128,160",
                 "--crf-iterations": "3,5,10", "--colour-weights": "0.5,0.75", "--tone-weights": "0.3,0.5"}


def _numbers(value: str, option: str) -> list[float]:
    from pixelvote.errors import ConfigError

    try:
        return [float(v) for v in _csv(value) or []]
    except ValueError:
        raise ConfigError(f"{option} {value}: not a comma-separated list of numbers",
                          fix=f"e.g. {option} {LIST_EXAMPLES.get(option, '1,2')}") from None


def _class_map(value: Optional[str]) -> Optional[dict[str, str]]:
    from pixelvote.errors import ConfigError

    pairs = [p.split(":") for p in _csv(value) or []]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ConfigError(f"--class-map {value}: not a list of 'data class:run class' pairs",
                          fix="e.g. --class-map benign:lesion,malignant:lesion")
    return {a.strip(): b.strip() for a, b in pairs} or None


CRF_ITERATIONS_HELP = ("the segmenter's dense-CRF mean-field iterations to try (with the run's own); more "
                       "iterations cost more per image: fire's masks were best after 10-20, BUSI's after 2 "
                       "(see README)")


def _whole(numbers: list[float], option: str) -> list[int]:
    from pixelvote.errors import ConfigError

    if any(n != int(n) for n in numbers):
        raise ConfigError(f"{option} {','.join(f'{n:g}' for n in numbers)}: not whole numbers",
                          fix=f"e.g. {option} 128,160")
    return [int(n) for n in numbers]


def _crf_iterations(value: str) -> tuple[int, ...]:
    from pixelvote.errors import ConfigError

    numbers = _numbers(value, "--crf-iterations")
    if not numbers or any(n != int(n) or not 1 <= n <= 50 for n in numbers):
        raise ConfigError(f"--crf-iterations {value}: not whole numbers from 1 to 50",
                          fix="e.g. --crf-iterations 2,3,5,10")
    return tuple(int(n) for n in numbers)


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, "--data",
                                        help="images/<class>/..., a CSV manifest, or a TBX11K root"),
    out: Path = typer.Option(..., "--out", help="run folder to create (or to continue, with --resume)"),
    preset: str = typer.Option("offline-os16", help="offline-os16 (EfficientNet-Lite0/1/2 at output stride "
                               "16: finer CAMs; no internet), offline (the same at stride 32, ~1.25x faster) "
                               "or paper"),
    models: Optional[str] = typer.Option(None, help="comma-separated backbones instead of the preset"),
    epochs: int = typer.Option(8, min=1),
    image_size: int = typer.Option(224, min=32),
    batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(3e-4),
    dropout: float = typer.Option(0.3, help="dropout rate of each member's head (MC Dropout)"),
    seed: int = typer.Option(0),
    background: Optional[str] = typer.Option(None, help="the no-finding class (default: normal/healthy/...)"),
    group_pattern: Optional[str] = typer.Option(
        None, help=r"regex on file names; group 1 keeps e.g. ^(Video\d+) together"),
    train_exclude: Optional[str] = typer.Option(
        None, help=r"regex on file names: leave matching images out of training (those in validation stay "
                   "there; e.g. ^Video: a source only one class has; see README)"),
    calibrate_excluded: bool = typer.Option(
        True, help="calibration also scores the masks of the images --train-exclude kept out of training "
                   "(evaluate --split excluded scores the rest)"),
    calibration_per_group: int = typer.Option(
        10, min=0, help="with --group-pattern, calibration scores at most this many masked images of each "
                       "group (evenly spaced; 0: all): more groups, not more frames, make the choice hold"),
    val_fraction: float = typer.Option(0.2),
    augment: str = typer.Option("standard", help="standard, or robust: + wider crops, blur and JPEG "
                                "re-compression, against a source shortcut (see README)"),
    resize: str = typer.Option("squash", help="how an image becomes the square model input: squash (stretch) "
                               "or letterbox (keep the aspect ratio, pad); annotate and evaluate follow the "
                               "run"),
    patience: int = typer.Option(3, help="early stopping patience (epochs)"),
    mc_variance_weight: float = typer.Option(0.0,
                                             help="the paper's lambda x MC-dropout variance in the loss"),
    mc_samples: int = typer.Option(30, help="T, MC samples for calibration and annotation"),
    cam_layer: Optional[str] = typer.Option(None, help="CAM target layer (default: each backbone's last)"),
    max_map_cost: float = typer.Option(2.0, min=1.0, help="choose only map recipes costing at most this many "
                                       "plain analyses of the run's own members per image (TTA costs 6; the "
                                       "CRF's share depends on the members, 0.24-0.66 at 160 px with 15 "
                                       "iterations; calibration.json says)"),
    max_pseudo_label_cost: float = typer.Option(2.5, min=1.0, help="the costliest recipe `annotate --method "
                                                "best` may use (pseudo-masks for `segment train`)"),
    crf: bool = typer.Option(True, "--crf/--no-crf", help="try the dense-CRF refinement on validation masks "
                             "(needs pydensecrf2: pip install 'pixelvote[crf]')"),
    crf_weights: str = typer.Option("10,30", help="the dense CRF's bilateral (colour) weights to try; the "
                                    "validation masks choose one"),
    crf_iterations: str = typer.Option("3,5,10,15", help="the dense CRF's mean-field iterations to try (one "
                                       "pass serves them all); the validation masks choose one, within "
                                       "--max-map-cost (at 160 px each iteration costs 2-3% of a plain "
                                       "analysis: README)"),
    crf_cutoffs: str = typer.Option("0.3,0.5", help="cutoffs on the dense CRF's object probability to try "
                                    "(the mask is where it exceeds the cutoff; no extra CRF pass); the "
                                    "validation masks choose one"),
    crf_sizes: str = typer.Option("128,160", help="sizes (the longer side, px) the dense CRF runs at to "
                                  "try; the validation masks choose one, within --max-map-cost (a larger "
                                  "one costs more: its pixels)"),
    crf_recipes: int = typer.Option(2, min=1, help="try the dense CRF's grid on this many map recipes per "
                                    "choice: those whose masks without it score best on validation (the "
                                    "grid is most of calibration's time)"),
    crf_bases: int = typer.Option(2, min=1, help="on each of those recipes, try the CRF's grid on "
                                  "this many fusions (with or without the colour and tone priors): those "
                                  "whose masks without it score best on validation"),
    colour: bool = typer.Option(True, "--colour/--no-colour", help="learn a colour prior (P(finding | "
                                "colour)) from the training images' labels and try it with the mean fusion "
                                "on validation masks"),
    colour_weights: str = typer.Option("0.75", help="the colour prior's weights to try (the fused map is "
                                       "weighted 1 - w); the validation masks choose"),
    tone: bool = typer.Option(True, "--tone/--no-tone", help="learn from the training images' labels "
                              "whether findings are darker or brighter than their surroundings, and try that "
                              "tone map with the mean fusions on validation masks"),
    tone_weights: str = typer.Option("0.5", help="the tone map's weights to try (the fused map is weighted "
                                     "1 - w); the validation masks choose"),
    colour_evidence: bool = typer.Option(True, "--colour-evidence/--no-colour-evidence", help="with the "
                                         "colour prior, try a diagnosis that also weighs the colour evidence "
                                         "where the models look; kept only where it beats the threshold "
                                         "on held-out validation images"),
    decision: str = typer.Option("validation", help="validation: diagnose a finding where P(not background) "
                                 "exceeds a threshold chosen by accuracy on the validation images; "
                                 "most-probable: the most probable class"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="start from ImageNet weights"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="folder of local ImageNet weight files"),
    resume: bool = typer.Option(False, help="continue an interrupted run in --out"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when present)"),
    verbose: bool = typer.Option(True, "--verbose/--quiet"),
) -> None:
    """Fine-tune the ensemble on image-level labels and calibrate its thresholds on the validation split."""
    _setup_logging(verbose)
    from pixelvote.errors import ConfigError
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train as run_train

    if data is None and not resume:
        raise ConfigError("--data is required to start a run",
                          fix="pass --data DIR, or --resume to continue --out")
    if resume:  # the run's own settings are used; only --out matters
        saved = out / "train_config.json"
        if not saved.exists():
            from pixelvote.errors import CheckpointError

            raise CheckpointError("nothing to resume: no train_config.json", path=out,
                                  fix="start a new run with --data (without --resume)")
        from pixelvote.train.loop import saved_config

        data = Path(saved_config(saved).data)
    cfg = TrainConfig(data=data, out=out, preset=preset, models=_csv(models), epochs=epochs,
                      image_size=image_size, batch_size=batch_size, lr=lr, dropout=dropout, seed=seed,
                      background=background, group_pattern=group_pattern, train_exclude=train_exclude,
                      calibrate_excluded=calibrate_excluded, calibration_per_group=calibration_per_group,
                      val_fraction=val_fraction, patience=patience, augment=augment, resize=resize,
                      mc_variance_weight=mc_variance_weight, mc_samples=mc_samples, cam_layer=cam_layer,
                      pretrained=pretrained, weights_dir=weights, device=device, max_map_cost=max_map_cost,
                      max_pseudo_label_cost=max_pseudo_label_cost,
                      refine_candidates=["none", "crf"] if crf else ["none"], decision=decision,
                      crf_weights=_numbers(crf_weights, "--crf-weights"),
                      crf_iterations=list(_crf_iterations(crf_iterations)),
                      crf_cutoffs=_numbers(crf_cutoffs, "--crf-cutoffs"),
                      crf_sizes=_whole(_numbers(crf_sizes, "--crf-sizes"), "--crf-sizes"),
                      crf_recipes=crf_recipes, crf_bases=crf_bases,
                      colour_weights=_numbers(colour_weights, "--colour-weights") if colour else [],
                      tone_weights=_numbers(tone_weights, "--tone-weights") if tone else [],
                      colour_evidence=colour_evidence)
    try:
        run = run_train(cfg, resume=resume)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the last finished epoch is saved; continue with "
                   f"`pixelvote train --out {out} --resume`", err=True)
        raise typer.Exit(130) from None
    cal = json.loads((run / "calibration.json").read_text())
    typer.echo(f"run saved to {run}")
    skipped = run / "skipped.jsonl"
    rule = cal.get("decision", {}).get("threshold")
    typer.echo(f"validation: accuracy {cal['val_accuracy']:.3f}"
               + (f" (a finding where P(any finding) > {rule}; with the most probable class: "
                  f"{cal['decision']['val_accuracy_most_probable']:.3f})" if rule is not None else "")
               + (f", mean IoU {cal['val_mean_iou']:.3f} at threshold {cal['consensus']['threshold']}"
                  if cal.get("val_mean_iou") is not None else " (no masks: threshold 0.5 of the max)")
               + (f" with {sel['recipe']} maps and {sel['fusion']} fusion"
                  if (sel := cal.get("selection")) else ""))
    if skipped.exists() and skipped.stat().st_size:
        n = len(skipped.read_text(encoding="utf-8").splitlines())
        typer.echo(f"{n} input(s) were skipped; they are listed in {skipped}", err=True)
        raise typer.Exit(3)


@app.command()
def annotate(
    run: Path = typer.Option(..., "--run", help="a run folder from `pixelvote train`"),
    images: str = typer.Option(..., "--images", help="folder (searched recursively) or CSV with a path "
                               "column; --engine ray also takes a folder URI (s3://bucket/prefix, ...)"),
    out: Path = typer.Option(..., "--out", help="output folder (re-running skips finished images)"),
    batch_size: int = typer.Option(8, min=1),
    mc_samples: Optional[int] = typer.Option(None, min=1, help="T (default: the run's)"),
    workers: Optional[int] = typer.Option(None, min=0, help="decoding worker processes (default: up to 4 "
                                                            "feeding a GPU; on a CPU the cores torch leaves "
                                                            "free)"),
    policy: Optional[str] = typer.Option(None, help="unanimous | majority | k-of-n"),
    k: Optional[int] = typer.Option(None, help="k for k-of-n"),
    fusion: Optional[str] = typer.Option(None, help="intersection | mean | vote"),
    threshold_method: Optional[str] = typer.Option(None, help="fixed | otsu | percentile"),
    threshold: Optional[float] = typer.Option(None, help="fixed threshold as a fraction of each map's max"),
    method: str = typer.Option("run", help="run: the run's calibrated recipe; best: the best one on "
                               "validation within train's --max-pseudo-label-cost (costlier; for masks that "
                               "train a segmenter); paper: plain XGrad-CAM, unanimous intersection at 0.5"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta",
                                       help="flip + 0.75/1/1.25 scale test-time augmentation"),
    layer_fusion: Optional[str] = typer.Option(None,
                                               help="none | mean | geometric (earlier-layer XGrad-CAM)"),
    refine: Optional[str] = typer.Option(None, help="none | guided (edge-aware refinement of each map)"),
    contrast: Optional[bool] = typer.Option(None, "--contrast/--no-contrast", help="explain logit(finding) - "
                                            "logit(background) instead of the finding's logit (default: as "
                                            "the run chose)"),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="dense-CRF refinement of the fused map "
                                       "(default: as the run chose; needs pixelvote[crf])"),
    segmenter: Optional[Path] = typer.Option(None, help="masks from a `pixelvote segment train` folder"),
    labels: bool = typer.Option(False, "--labels/--no-labels", help="the images are labelled (class folders "
                                "DIR/<class>/... or DIR/images/<class>/..., or a CSV label column): explain "
                                "each image's own class and flag where the diagnosis differs"),
    device: Optional[str] = typer.Option(None),
    engine: str = typer.Option("local", "--engine", help="local: this process; ray: Ray workers "
                               "(pip install 'pixelvote[ray]'; see docs/scale-out.md)"),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: a running cluster (auto, "
                                          "HOST:6379, ray://HOST:10001); default: a local Ray instance"),
    num_workers: int = typer.Option(2, "--num-workers", min=1, help="--engine ray: worker actors, each loads "
                                    "the ensemble once (1 GPU each when the cluster has GPUs)"),
    verbose: bool = typer.Option(False, "--verbose/--quiet"),
) -> None:
    """Annotate images: masks, overlays, uncertainty maps and annotations.jsonl with review flags."""
    _setup_logging(verbose)
    from pixelvote.engine.annotate import annotate as run_annotate

    overrides = {k_: v for k_, v in dict(policy=policy, k=k, fusion=fusion, threshold_method=threshold_method,
                                         threshold=threshold).items() if v is not None}
    if crf is not None:
        overrides["refine"] = "crf" if crf else "none"
    maps: dict = {k_: v for k_, v in dict(layer_fusion=layer_fusion, refine=refine, contrast=contrast).items()
                  if v is not None}
    if tta is not None:
        maps.update(tta_flip=tta, tta_scales=(0.75, 1.0, 1.25) if tta else (1.0,))
    if engine not in ("local", "ray"):
        from pixelvote.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown --engine: {did_you_mean(engine, ('local', 'ray'))}")
    if engine == "ray" and labels:
        from pixelvote.errors import ConfigError

        raise ConfigError("--labels is not available with --engine ray yet",
                          fix="annotate labelled images with --engine local")
    if engine == "ray":
        from pixelvote.engine.ray_engine import annotate_ray

        s = annotate_ray(run, images, out, batch_size=batch_size, mc_samples=mc_samples,
                         num_workers=num_workers, address=address, device=device, consensus=overrides,
                         maps=maps, method=method, segmenter=segmenter)
    else:
        s = run_annotate(run, images, out, batch_size=batch_size, mc_samples=mc_samples, num_workers=workers,
                         device=device, consensus=overrides, maps=maps, method=method, segmenter=segmenter,
                         labels=labels)
    typer.echo(f"{s.annotated} annotated, {s.already_done} already done, {s.skipped} skipped, "
               f"{s.flagged} flagged for review; labels {s.labels}")
    typer.echo(f"outputs in {s.out} (annotations.jsonl, masks/, overlays/, uncertainty/)")
    if s.skipped:
        typer.echo(f"skipped inputs are listed in {s.out / 'skipped.jsonl'}", err=True)
        raise typer.Exit(3)


@app.command()
def demo(
    where: Path = typer.Option(Path("pixelvote-demo"), help="working folder"),
    epochs: int = typer.Option(4, min=1),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    preset: str = typer.Option("offline-os16"),
) -> None:
    """Generate a synthetic dataset, train the offline ensemble briefly, annotate, and report."""
    _setup_logging(False)
    from pixelvote.demo import run_demo

    r = run_demo(where, epochs=epochs, pretrained=pretrained, preset=preset)
    typer.echo(f"\nannotated {r['images']} new images: accuracy {r['accuracy']:.3f}, "
               f"mean IoU {r['mean_iou']:.3f} on {r['iou_images']} lesion images, {r['flagged']} flagged "
               "for review")
    typer.echo(f"run: {r['run']}\nannotations: {r['annotations']} "
               "(masks/, overlays/, uncertainty/, annotations.jsonl)")


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", help="a run folder from `pixelvote train`"),
    data: Path = typer.Option(..., "--data", help="labelled images (+ masks or TBX11K boxes)"),
    out: Path = typer.Option(..., "--out", help="report folder: metrics.json and report.html"),
    split: Optional[str] = typer.Option(None, help="val | test | excluded (the images --train-exclude kept "
                                              "out of training) | all (default: val on the run's own data)"),
    mc_samples: Optional[int] = typer.Option(None, min=1, help="T (default: the run's)"),
    batch_size: int = typer.Option(8, min=1),
    method: str = typer.Option("run", help="run (the calibrated recipe), best (the best within the "
                               "pseudo-label cost limit) or paper (the paper's fixed rule)"),
    max_gallery: int = typer.Option(12),
    dataset: Optional[str] = typer.Option(None, help="name shown in the report (busi, fire, tbx11k, ...)"),
    segmenter: Optional[Path] = typer.Option(None, help="also score this `pixelvote segment train` folder's "
                                             "masks (and, with the crf extra, their CRF refinement)"),
    labels: bool = typer.Option(False, "--labels/--no-labels", help="score masks as `annotate --labels` "
                                "makes them: decided by each image's true class, not gated by the diagnosis"),
    class_map: Optional[str] = typer.Option(None, "--class-map", help="data classes the run calls otherwise: "
                                            "'benign:lesion,malignant:lesion' (data class:run class)"),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Evaluate a run: classification, pixel IoU/Dice (vs the centred-box prior), uncertainty; HTML report."""
    _setup_logging(False)
    from pixelvote.evaluate.run import evaluate_run

    m = evaluate_run(run, data, out, split=split, mc_samples=mc_samples, batch_size=batch_size, device=device,
                     method=method, max_gallery=max_gallery, dataset=dataset, segmenter=segmenter,
                     labels=labels, class_map=_class_map(class_map))
    ens = (m.get("classification") or {}).get("ensemble") or {}
    pix = (m.get("pixel") or {}).get("consensus") or {}
    line = f"{m.get('n_images')} images"
    if ens.get("accuracy") is not None:
        line += f", ensemble accuracy {ens['accuracy']:.3f}"
    if pix.get("mean_iou") is not None:
        line += f", consensus mean IoU {pix['mean_iou']:.3f}"
    for name, row in ((m.get("pixel") or {}).get("segmenter") or {}).items():
        line += f", {name} mean IoU {row['mean_iou']:.3f}"
    typer.echo(line)
    groups = (((m.get("pixel") or {}).get("by_group") or {}).get("groups")) or {}
    if groups:
        typer.echo("consensus mean IoU by group: " + ", ".join(
            f"{g} {r['mean_iou']:.3f} ({r['images']})" for g, r in groups.items()))
    typer.echo(f"report: {out / 'report.html'}; numbers: {out / 'metrics.json'}")


@app.command()
def export(
    source: Path = typer.Option(..., "--from", help="an annotation output folder (pixelvote annotate --out)"),
    fmt: str = typer.Option(..., "--format",
                            help="coco | coco-results | labelstudio | cvat | monailabel | png | nifti"),
    to: Path = typer.Option(..., "--to", help="file or folder to write (see docs/exports.md)"),
) -> None:
    """Export masks and flags to an annotation tool's format."""
    from pixelvote.export import export_annotations, skipped_report_path

    path = export_annotations(source, fmt, to, skip_bad=True)
    typer.echo(f"wrote {path}")
    report = skipped_report_path(to, fmt)
    if report.exists():
        rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
        for row in rows:
            typer.echo(f"skipped: {row['reason']}", err=True)
        typer.echo(f"{len(rows)} record(s) with an unusable mask were left out; listed in {report}", err=True)
        raise typer.Exit(3)


@app.command("import")
def import_(
    fmt: str = typer.Option(..., "--format", help="coco | labelstudio"),
    source: Path = typer.Option(..., "--from", help="the tool's export file"),
    to: Path = typer.Option(..., "--to", help="new annotation output folder (records marked reviewed)"),
    background: Optional[str] = typer.Option(None, help="background class name, if the file does not say"),
) -> None:
    """Import corrected annotations back into pixelvote's layout (marked as reviewed)."""
    from pixelvote.export import import_annotations

    opts = {"background": background} if background else {}
    path = import_annotations(fmt, source, to, **opts)
    typer.echo(f"imported into {path}")


segment_app = typer.Typer(help="Stage two: a segmentation network learned from the consensus masks.")
app.add_typer(segment_app, name="segment")


@segment_app.command("train")
def segment_train(
    annotations: Path = typer.Option(..., "--annotations",
                                     help="an annotation output folder (annotate --out)"),
    out: Path = typer.Option(..., "--out", help="segmenter folder to write"),
    run: Optional[Path] = typer.Option(None, "--run",
                                       help="the ensemble run (for classes, if OUT lacks them)"),
    reviewed_only: bool = typer.Option(False, "--reviewed-only", help="train on reviewed masks only"),
    all_images: bool = typer.Option(False, "--all", help="also use flagged, unreviewed images"),
    encoder: str = typer.Option("efficientnet_lite0"),
    epochs: int = typer.Option(30, min=1),
    image_size: int = typer.Option(224, min=64, help="a multiple of 32, at least 64 (the FPN needs it)"),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    decoder: str = typer.Option("light", "--decoder", help="light (64/32-channel FPN, fast) or full (smp's "
                                "256/128: better masks, ~4x slower)"),
    augment: bool = typer.Option(False, "--augment/--no-augment", help="random crops, small rotations and "
                                 "brightness/contrast jitter (else flips only; on BUSI it scored lower)"),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="annotate refines the segmenter's masks "
                                       "with the dense CRF (default: on where pixelvote[crf] is installed; "
                                       "`evaluate --segmenter` shows both rows)"),
    encoder_init: str = typer.Option("run", "--encoder-init", help="run: the encoder starts from the run's "
                                     "fine-tuned member of the same network (--run, or the run that "
                                     "annotated OUT); imagenet: from ImageNet weights"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="choose the segmenter's mask and "
                                   "CRF thresholds on the run's validation masks (else 0.5)"),
    crf_iterations: str = typer.Option("2,3,5", help=CRF_ITERATIONS_HELP),
    members: int = typer.Option(1, "--members", min=1, help="train this many segmenters (seeds SEED, SEED+1, "
                                "...; each in OUT/member-<i>) and combine them into OUT (see `segment "
                                "combine`): steadier masks, at that many times the cost"),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Train a segmenter on unflagged consensus masks (+ reviewed masks, weighted higher)."""
    _setup_logging(True)
    from pixelvote.segment.train import SegConfig, decoder_settings, skipped_inputs, train_segmenter

    iterations = _crf_iterations(crf_iterations)

    mode = "reviewed" if reviewed_only else ("all" if all_images else "confident")
    cfg = SegConfig(encoder=encoder, epochs=epochs, image_size=image_size, batch_size=batch_size, seed=seed,
                    mode=mode, augment=augment, crf=crf, encoder_init=encoder_init,
                    **decoder_settings(decoder))
    if members > 1:
        from pixelvote.segment.combine import train_combined

        if not calibrate:
            raise typer.BadParameter("--members chooses the combination's thresholds on the run's validation "
                                     "masks; drop --no-calibrate", param_hint="--members")
        path = train_combined(annotations, out, members, run=run, cfg=cfg, pretrained=pretrained,
                              device=device, crf_iterations=iterations)
    else:
        path = train_segmenter(annotations, out, run=run, cfg=cfg, pretrained=pretrained, device=device,
                               calibrate=calibrate, crf_iterations=iterations)
    if calibrate:
        _echo_segmenter_thresholds(path)
    typer.echo(f"segmenter saved to {path}; use it with `pixelvote annotate --segmenter {path}`")
    skipped = skipped_inputs(path)
    if skipped:
        typer.echo(f"{len(skipped)} input(s) were skipped; they are listed in {path / 'skipped.jsonl'}",
                   err=True)
        raise typer.Exit(3)


@segment_app.command("calibrate")
def segment_calibrate(
    segmenter: Path = typer.Option(..., "--segmenter", help="a `segment train --out` folder"),
    run: Path = typer.Option(..., "--run", help="the ensemble run whose validation masks score them"),
    crf_iterations: str = typer.Option("2,3,5", help=CRF_ITERATIONS_HELP),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Choose a trained segmenter's mask and CRF settings on a run's validation masks (segment train does
    this itself; use it for a segmenter trained without --run or before this version)."""
    _setup_logging(True)
    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.segment.train import calibrate_segmenter, load_segmenter

    iterations = _crf_iterations(crf_iterations)
    model, _ = load_segmenter(segmenter, device=device)  # a clear error for a folder that is not one
    read_run_config(run)  # likewise for a run
    calibrate_segmenter(segmenter, run, model=model, crf_iterations=iterations)
    _echo_segmenter_thresholds(segmenter)


@segment_app.command("combine")
def segment_combine(
    segmenters: list[Path] = typer.Argument(..., help="two or more `segment train --out` folders"),
    out: Path = typer.Option(..., "--out", help="folder for the combined segmenter"),
    run: Optional[Path] = typer.Option(None, "--run", help="the ensemble run whose validation masks choose "
                                       "the combination's thresholds (else they stay 0.5)"),
    crf_iterations: str = typer.Option("2,3,5", help=CRF_ITERATIONS_HELP),
) -> None:
    """Combine segmenters trained apart (other --seed or --encoder) into one that averages their
    probabilities: steadier masks than any one of them (use it with `annotate --segmenter OUT`)."""
    _setup_logging(True)
    from pixelvote.segment.combine import combine_segmenters

    iterations = _crf_iterations(crf_iterations)
    if run is not None:
        from pixelvote.models.checkpoint import read_run_config

        read_run_config(run)  # a clear error for a folder that is not a run, before any work
    path = combine_segmenters(segmenters, out, run=run, crf_iterations=iterations)
    _echo_segmenter_thresholds(path)
    typer.echo(f"{len(segmenters)} segmenters combined into {path}; use it with `pixelvote annotate "
               f"--segmenter {path}`")


def _echo_segmenter_thresholds(segrun: Path) -> None:
    summary = json.loads((segrun / "calibration.json").read_text())
    if summary.get("threshold") is None:
        typer.echo(f"segmenter thresholds not chosen: {summary['source']}")
        return
    crf = (f"; its dense CRF treats {summary['crf_threshold']} as undecided, runs "
           f"{summary.get('crf_iterations')} iterations and keeps what it refines above "
           f"{summary.get('crf_cutoff')} (IoU {summary['crf_threshold_iou']:.3f}); annotate takes the "
           f"{'CRF-refined' if summary.get('mask') == 'crf' else 'plain'} mask"
           if summary.get("crf_threshold") is not None else "")
    typer.echo(f"segmenter thresholds chosen on {summary['images']} validation masks: mask at "
               f"{summary['threshold']} (IoU {summary['threshold_iou']:.3f}){crf}")


@app.command()
def improve(
    run: Path = typer.Option(..., "--run"),
    images: Path = typer.Option(..., "--images", help="the images to annotate (folder or CSV)"),
    work: Path = typer.Option(..., "--out", help="working folder: round0/, round1/, ..., improve_log.json"),
    rounds: int = typer.Option(1, min=1),
    truth: Optional[Path] = typer.Option(None, help="DATA root with masks/: simulate reviews and log IoU"),
    review_fraction: float = typer.Option(0.2,
                                          help="share of the most uncertain images reviewed (simulated)"),
    seg_epochs: int = typer.Option(30, min=1),
    seg_decoder: str = typer.Option("light",
                                    help="light or full segmenter decoder (see `segment train --decoder`)"),
    method: str = typer.Option("best", help="the recipe of the consensus masks the first segmenter learns "
                               "from (see `annotate --method`)"),
    labels: bool = typer.Option(False, "--labels/--no-labels", help="the images are labelled: annotate with "
                                "their labels (see `annotate --labels`)"),
    seg_members: int = typer.Option(1, "--seg-members", min=1, help="segmenters trained (other seeds) and "
                                    "combined each round (see `segment train --members`)"),
    device: Optional[str] = typer.Option(None),
) -> None:
    """The loop a team runs: annotate -> review -> retrain the segmenter -> re-annotate (log IoU per round)."""  # noqa: E501 - one line: typer shows it as the command's summary
    _setup_logging(True)
    from pixelvote.segment.improve import improve as run_improve

    for entry in run_improve(run, images, work, rounds=rounds, truth=truth, review_fraction=review_fraction,
                             seg_epochs=seg_epochs, device=device, seg_decoder=seg_decoder, method=method,
                             labels=labels, seg_members=seg_members):
        typer.echo(json.dumps(entry))


@app.command()
def review(
    out: Path = typer.Argument(..., help="an annotation output folder (pixelvote annotate --out)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; any but loopback needs --token"),
    port: int = typer.Option(8765, min=0, max=65535, help="port to listen on (0: any free port)"),
    reviewer: Optional[str] = typer.Option(None, help="name stored with each decision (default: your login)"),
    token: Optional[str] = typer.Option(None, envvar="PIXELVOTE_REVIEW_TOKEN",
                                        help="secret every request must present; required off loopback"),
    apply_to: Optional[Path] = typer.Option(None, "--apply-to",
                                            help="write OUT with the decisions applied to this new folder, "
                                                 "and exit"),
    only_reviewed: bool = typer.Option(False, "--only-reviewed",
                                       help="with --apply-to: reviewed images only"),
    verbose: bool = typer.Option(False, "--verbose/--quiet"),
) -> None:
    """Review flagged images in a local web app; every decision goes to OUT/review.sqlite."""
    _setup_logging(verbose)
    if only_reviewed and apply_to is None:
        from pixelvote.errors import ConfigError

        raise ConfigError("--only-reviewed selects what --apply-to writes, and no --apply-to was given",
                          fix="add --apply-to NEW_FOLDER, or drop --only-reviewed to start the review desk")
    if apply_to is not None:
        from pixelvote.review.apply import apply_reviews

        path = apply_reviews(out, apply_to, only_reviewed=only_reviewed)
        typer.echo(f"wrote the reviewed set to {path} (export it with `pixelvote export --from {path}`)")
        return
    from pixelvote.review.server import run_review

    run_review(out, host=host, port=port, reviewer=reviewer, token=token, announce=typer.echo)


@app.command("models")
def list_models_cmd() -> None:
    """List the registered backbones and presets."""
    from pixelvote.models.registry import PRESETS, get_spec, list_models

    for name in list_models():
        s = get_spec(name)
        typer.echo(f"{name:24s} {s.source:12s} CAM layer {s.cam_layer}")
    for p, names in PRESETS.items():
        typer.echo(f"preset {p}: {', '.join(names)}")


# seconds between redraws of a progress bar written to a file rather than a terminal
LOGGED_PROGRESS_INTERVAL_S = 30


def quiet_progress_off_terminal() -> None:
    """Off a terminal (a log file, a CI job, nohup) every redraw of a tqdm bar is kept, about ten lines a
    second, and a training log fills with them; there, redraw at most every 30 s. tqdm reads its defaults
    from ``TQDM_*`` when it is first imported, which no command has done yet; a user's own
    ``TQDM_MININTERVAL`` (or ``TQDM_DISABLE=1``) wins."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOGGED_PROGRESS_INTERVAL_S))


def main() -> None:
    from pydantic import ValidationError

    quiet_progress_off_terminal()
    try:
        app()
    except PixelvoteError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                             for e in exc.errors())
        typer.echo(f"error: invalid option value ({problems})", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a path the checks before the work could not foresee: disk full, permissions
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}. Fix: check that the path is the kind expected (a "
                   "folder or a file), that you may write there and that the disk has space", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
