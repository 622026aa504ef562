"""Training settings, validated in one place (CLI flags and the Python API build the same object)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelvote.errors import ConfigError
from pixelvote.models.registry import DEFAULT_PRESET


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    preset: str = DEFAULT_PRESET
    models: list[str] | None = None
    epochs: int = Field(8, ge=1)
    image_size: int = Field(224, ge=32, le=2048)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)
    head_lr_multiplier: float = Field(10.0, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    cam_layer: str | None = None
    patience: int = Field(3, ge=1, description="epochs without a better validation loss before stopping")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    augment: Literal["standard", "robust"] = Field(
        "standard", description="robust adds wider crops and aspect changes, blur and JPEG re-compression, "
                                "against classifiers that learn the source (camera, file type) instead of "
                                "the finding (see pixelvote.data.transforms.train_augment)")
    resize: Literal["squash", "letterbox"] = Field(
        "squash", description="how an image becomes the square model input: squash (stretch) or letterbox "
                              "(keep the aspect ratio, pad); the run keeps it for annotation and evaluation")
    group_pattern: str | None = None
    train_exclude: str | None = Field(None, description="regex on file names: matching images are left out "
                                      "of training (those in validation stay there; a source only one class "
                                      "has)")
    calibrate_excluded: bool = Field(
        True, description="calibration also scores the masks of the images train_exclude kept out of "
                          "training (never trained on): more sources to choose the masks on than the "
                          "validation split alone may hold; `evaluate --split excluded` scores the others")
    calibration_per_group: int = Field(
        10, ge=0, description="with group_pattern, calibration scores the masks of at most this many evenly "
                             "spaced images of each group (0: all): a video's frames are near-duplicates, "
                             "and masks chosen on more groups hold better on new ones "
                             "(bench/cross_video.py)")
    background: str | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)
    mc_variance_weight: float = Field(0.0, ge=0.0,
                                      description="the paper's lambda: loss += lambda * MC variance")
    mc_train_samples: int = Field(4, ge=2)
    mc_samples: int = Field(30, ge=1, description="T for calibration and annotation")
    flag_quantile: float = Field(0.9, gt=0.0, lt=1.0,
                                 description="MI/variance flag thresholds: this quantile on val")
    map_candidates: list[str] = Field(
        default_factory=lambda: ["plain", "contrast", "flip", "flip-contrast", "tta", "layers-geo", "guided"],
        description="map recipes tried on validation masks (see pixelvote.evaluate.selection.RECIPES)")
    refine_candidates: list[Literal["none", "crf"]] = Field(
        default_factory=lambda: ["none", "crf"],
        description="refinements of the fused map tried on validation masks (crf only where pydensecrf2 is "
                    "installed)")
    crf_weights: list[float] = Field(
        default_factory=lambda: [10.0, 30.0],
        description="bilateral (colour) weights of the dense CRF tried on validation masks: the chosen one "
                    "is saved in the run's consensus (crf.bilateral_compat); fire's masks want a higher one "
                    "than BUSI's (docs/results.md)")
    crf_iterations: list[int] = Field(
        default_factory=lambda: [3, 5, 10, 15],
        description="mean-field iterations of the dense CRF tried on validation masks (one pass serves them "
                    "all): the chosen count is saved in the run's consensus (crf.iterations); fire's masks "
                    "were best after 15, BUSI's after 3 (docs/results.md); each iteration is priced against "
                    "the members' own forward pass (pixelvote.evaluate.selection.CRF_MS)")
    crf_cutoffs: list[float] = Field(
        default_factory=lambda: [0.3, 0.5],
        description="cutoffs on the dense CRF's object probability tried on validation masks (the mask is "
                    "where it exceeds the cutoff; the same CRF passes serve them all): the chosen one is "
                    "saved in the run's consensus (crf.cutoff); fire's and BUSI's masks were best at 0.3 "
                    "(docs/results.md)")
    crf_sizes: list[int] = Field(
        default_factory=lambda: [128, 160],
        description="sizes (the longer side, px) the dense CRF runs at, tried on validation masks: the "
                    "chosen one is saved in the run's consensus (crf.size); its cost grows with its pixels; "
                    "sizes at or above the model input are one candidate, at the input's size")
    crf_recipes: int = Field(
        2, ge=1, description="the dense CRF's grid, the costliest part of calibration, is tried on this many "
                             "map recipes per choice (annotation, --labels, --method best): those whose "
                             "masks without it score best on the validation masks and leave room for it "
                             "within the cost limit")
    crf_bases: int = Field(
        2, ge=1, description="on each of those recipes, the dense CRF's grid is tried on this many fusions "
                             "(the intersection, the mean, the mean with the colour or tone prior): those "
                             "whose masks without it score best on the validation masks (on fire and BUSI "
                             "the best refined mask always refined one of the best two: docs/results.md)")
    colour_weights: list[float] = Field(
        default_factory=lambda: [0.75],
        description="weights of the colour prior (P(finding | colour), learned from the training images' "
                    "labels) tried with the mean fusion on validation masks, the map weighted 1 - w; empty: "
                    "no prior is learned")
    tone_weights: list[float] = Field(
        default_factory=lambda: [0.5],
        description="weights of the tone map (how much darker or brighter than its surroundings each pixel "
                    "is; which of the two is learned from the training images' labels) tried with every "
                    "mean fusion on validation masks, the map weighted 1 - w; empty: not tried")
    colour_evidence: bool = Field(
        True, description="with the colour prior, also try a diagnosis that weighs its evidence "
                          "(pixelvote.explain.evidence): kept only where it beats the threshold on P(not "
                          "background) on held-out halves of the validation images")
    max_map_cost: float = Field(2.0, ge=1.0, description="only recipes costing at most this many plain "
                                "analyses (about forward passes) per image are chosen; see "
                                "pixelvote.evaluate.selection.relative_cost")
    max_pseudo_label_cost: float = Field(2.5, ge=1.0, description="the costliest recipe `annotate --method "
                                         "best` may use: pseudo-masks for a segmenter are made once, so they "
                                         "may cost more per image than everyday annotation")
    min_masks_to_choose: int = Field(4, ge=1, description="validation masks needed before choosing a recipe")
    decision: Literal["validation", "most-probable"] = Field(
        "validation", description="the diagnosis rule: a threshold on P(not background) chosen by "
                                  "accuracy on the validation images, or the most probable class")
    pretrained: bool = True
    weights_dir: Path | None = None
    device: str | None = None
    num_threads: int | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ConfigError("--models is empty",
                              fix="name at least one model, e.g. --models efficientnet_lite0")
        return v

    @field_validator("map_candidates")
    @classmethod
    def _recipes(cls, v: list[str]) -> list[str]:
        from pixelvote.errors import did_you_mean
        from pixelvote.evaluate.selection import RECIPES

        for name in v:
            if name not in RECIPES:
                raise ConfigError(f"unknown map recipe: {did_you_mean(name, list(RECIPES))}")
        return v

    @field_validator("crf_weights")
    @classmethod
    def _crf_weights(cls, v: list[float]) -> list[float]:
        return _candidates(v, lambda w: w >= 0, "--crf-weights", "the dense CRF's bilateral weights must be "
                           "one or more numbers >= 0",
                           "e.g. --crf-weights 10,30 (or --no-crf to leave the CRF out)")

    @field_validator("crf_iterations")
    @classmethod
    def _crf_iterations(cls, v: list[int]) -> list[int]:
        return _candidates(v, lambda n: 1 <= n <= 50, "--crf-iterations", "the dense CRF's mean-field "
                           "iterations must be one or more whole numbers from 1 to 50",
                           "e.g. --crf-iterations 3,5,10 (or --no-crf to leave the CRF out)")

    @field_validator("crf_cutoffs")
    @classmethod
    def _crf_cutoffs(cls, v: list[float]) -> list[float]:
        return _candidates(v, lambda c: 0 < c < 1, "--crf-cutoffs", "the cutoffs on the dense CRF's object "
                           "probability must be one or more numbers in (0, 1)",
                           "e.g. --crf-cutoffs 0.3,0.5 (0.5: where the CRF finds the object more probable "
                           "than not)")

    @field_validator("crf_sizes")
    @classmethod
    def _crf_sizes(cls, v: list[int]) -> list[int]:
        return _candidates(v, lambda n: n >= 16, "--crf-sizes", "the sizes the dense CRF runs at must be one "
                           "or more whole numbers of pixels >= 16", "e.g. --crf-sizes 128,160")

    @field_validator("colour_weights")
    @classmethod
    def _colour_weights(cls, v: list[float]) -> list[float]:
        if any(not 0 < w <= 1 for w in v):
            raise ConfigError(f"--colour-weights {','.join(f'{w:g}' for w in v)}: the colour prior's weights "
                              "must be numbers above 0 and at most 1",
                              fix="e.g. --colour-weights 0.5,0.75 (or --no-colour to leave the prior out)")
        return sorted(set(v))

    @field_validator("tone_weights")
    @classmethod
    def _tone_weights(cls, v: list[float]) -> list[float]:
        if any(not 0 < w < 1 for w in v):
            raise ConfigError(f"--tone-weights {','.join(f'{w:g}' for w in v)}: the tone map's weights must "
                              "be numbers between 0 and 1 (the fused map keeps 1 - w)",
                              fix="e.g. --tone-weights 0.3,0.5 (or --no-tone to leave it out)")
        return sorted(set(v))

    def model_names(self) -> list[str]:
        from pixelvote.models.registry import get_spec, preset_models

        names = list(self.models) if self.models else list(preset_models(self.preset))
        for n in names:
            get_spec(n)
        return names


def _candidates(values: list, ok: Callable[[Any], bool], option: str, what: str, fix: str) -> list:
    """``values`` sorted and without repeats, or a :class:`ConfigError` naming ``option`` where there are
    none or one is not ``ok``."""
    if not values or not all(ok(v) for v in values):
        raise ConfigError(f"{option} {','.join(f'{v:g}' for v in values) or '(empty)'}: {what}", fix=fix)
    return sorted(set(values))
