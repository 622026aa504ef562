"""A run folder: weights as safetensors plus a JSON description. Loading never unpickles anything.

```
RUN/run.json                     RunConfig (format_version, classes, members, consensus, ...)
RUN/members/<i>_<name>.safetensors   best weights of each member
RUN/history.json                 per-epoch training log
RUN/checkpoint/                  last state for --resume (weights, optimiser, progress)
```
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pixelvote.consensus import ConsensusConfig
from pixelvote.data.imageio import write_bytes_atomic, write_json_atomic
from pixelvote.errors import CheckpointError
from pixelvote.explain.analyze import MapConfig
from pixelvote.explain.evidence import EvidenceRule
from pixelvote.models.ensemble import Ensemble
from pixelvote.models.member import Member, build_member

FORMAT_VERSION = 1


class MemberConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dropout: float = 0.3
    cam_layer: str | None = None
    file: str = ""


class Recipe(BaseModel):
    """A map recipe with its consensus settings, as calibration chose it."""

    model_config = ConfigDict(extra="forbid")
    consensus: ConsensusConfig
    maps: MapConfig


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    classes: list[str]
    background: str
    image_size: int = 224
    # how images become the square input (pixelvote.data.transforms.fit_image); runs before it: squash
    resize: Literal["squash", "letterbox"] = "squash"
    members: list[MemberConfig]
    consensus: ConsensusConfig = Field(default_factory=ConsensusConfig)
    maps: MapConfig = Field(default_factory=MapConfig)
    # the best recipe on validation masks within train's --max-pseudo-label-cost (annotate --method best):
    # costlier than ``maps``/``consensus`` per image, for the one-off pseudo-masks that train a segmenter
    best: Recipe | None = None
    # the best recipe within --max-map-cost when the images' labels decide (annotate --labels --method run)
    labelled: Recipe | None = None
    # the diagnosis is a finding where P(not background) exceeds this, chosen on the validation images by
    # accuracy; None (runs before it, or too few validation images): the most probable class
    decision_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    # where it beat the threshold on the validation images: the diagnosis weighs the colour evidence too
    # (pixelvote.explain.evidence, with consensus.colour_prior) and this rule replaces decision_threshold
    decision_evidence: EvidenceRule | None = None
    mc_samples: int = 30
    seed: int = 0
    train: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""

    @model_validator(mode="after")
    def _evidence_needs_prior(self) -> RunConfig:
        if self.decision_evidence is not None and self.consensus.colour_prior is None:
            raise ValueError("decision_evidence is set but consensus.colour_prior is missing: the rule "
                             "weighs the colour prior's evidence. Remove decision_evidence (the diagnosis "
                             "then uses decision_threshold) or re-run `pixelvote train`")
        return self


def versions() -> dict[str, str]:
    import timm
    import torchvision

    from pixelvote import __version__

    return {"pixelvote": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def member_file(i: int, name: str) -> str:
    return f"members/{i}_{name}.safetensors"


def save_weights(path: Path, module: torch.nn.Module | dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    state = module if isinstance(module, dict) else module.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_bytes_atomic(path, save(state, metadata=metadata or {}))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not path.exists():
        raise CheckpointError("weights file is missing", path=path,
                              fix="the run folder is incomplete: re-run `pixelvote train` or `--resume`")
    try:
        return load(path.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"weights file is corrupt or truncated ({exc})", path=path,
                              fix="restore it from a backup or re-train the run") from None


def save_run_config(run_dir: Path, cfg: RunConfig) -> None:
    if not cfg.created:
        cfg.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if not cfg.versions:
        cfg.versions = versions()
    write_json_atomic(run_dir / "run.json", cfg.model_dump(mode="json"))


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not path.exists():
        raise CheckpointError("not a pixelvote run (no run.json)", path=run_dir,
                              fix="pass the --out folder of `pixelvote train`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"run.json is not valid JSON ({exc})", path=path,
                              fix="restore it, or re-train the run") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise CheckpointError("run.json has no format_version", path=path, fix="re-train the run")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"run format {version} was written by a newer pixelvote (this one reads "
                              f"{FORMAT_VERSION})", path=path,
                              fix="upgrade pixelvote: pip install -U pixelvote")
    if version < FORMAT_VERSION:
        raise CheckpointError(f"run format {version} is older than this pixelvote's ({FORMAT_VERSION})",
                              path=path, fix="re-train the run with this version")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"run.json is not a valid run description: {exc.errors()[0]['msg']} at "
                              f"{'.'.join(str(p) for p in exc.errors()[0]['loc'])}", path=path,
                              fix="restore it, or re-train the run") from None


def build_members(cfg: RunConfig, *, pretrained: bool = False,
                  weights_dir: str | Path | None = None) -> list[Member]:
    return [build_member(m.name, len(cfg.classes), dropout=m.dropout, pretrained=pretrained,
                         weights_dir=weights_dir, cam_layer=m.cam_layer) for m in cfg.members]


def _state_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``got`` from loading into a module whose state is ``expected`` ("expected … but got …")."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        return (f"expected tensors {missing[:3]} but the file has {extra[:3]}" if missing and extra else
                f"tensors {missing[:3]} are missing" if missing else f"unexpected tensors {extra[:3]}")
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            return f"expected {k} of shape {tuple(v.shape)} but got {tuple(got[k].shape)}"
    return None


def load_module_state(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load safetensors weights into ``module``: names, shapes and finiteness checked, errors name the
    file."""
    state = load_weights(path)
    problem = _state_mismatch(module.state_dict(), state)
    if problem is not None:
        raise CheckpointError(f"weights do not fit {what}: {problem}", path=path,
                              fix="the file belongs to another run or model: re-train")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"weights of {what} hold NaN or infinite values ({bad[0]})", path=path,
                              fix="the file is damaged, or training diverged: restore it or re-train")
    module.load_state_dict(state, strict=True)


def load_member_state(member: Member, path: Path) -> None:
    load_module_state(member, path, f"{member.name} with this run's {member.fc.out_features} classes")


def load_run(run_dir: str | Path, *, device: torch.device | str | None = None,
             cam_layer: str | None = None, fold: bool = False) -> tuple[Ensemble, RunConfig]:
    """Load a trained ensemble (eval mode) and its configuration. ``fold``: fold batch norms into the
    convolutions before them (faster inference, same outputs up to float rounding; not for training)."""
    from pixelvote.models.ensemble import resolve_device

    dev = resolve_device(device)
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if (run_dir / "checkpoint" / "state.json").exists() and not (run_dir / "calibration.json").exists():
        logging.getLogger(__name__).warning(
            "%s: this run's training or calibration did not finish, so its masks and flags use uncalibrated "
            "defaults; finish it with `pixelvote train --out %s --resume`", run_dir, run_dir)
    members = []
    for i, mc in enumerate(cfg.members):
        member = build_member(mc.name, len(cfg.classes), dropout=mc.dropout, pretrained=False,
                              cam_layer=mc.cam_layer)
        load_member_state(member, run_dir / (mc.file or member_file(i, mc.name)))
        if cam_layer:
            member = _with_cam_layer(member, cam_layer)
        members.append(member)
    ens = Ensemble(members, cfg.classes, cfg.background, cfg.image_size, resize=cfg.resize,
                   decision_threshold=cfg.decision_threshold, evidence_rule=cfg.decision_evidence,
                   colour_prior=cfg.consensus.colour_prior)
    ens = ens.to(dev).eval()
    if fold:
        ens.fold_batchnorm()
    return ens, cfg


def _with_cam_layer(member: Member, layer: str) -> Member:
    out = Member(member.name, member.backbone, member.fc.in_features, member.fc.out_features, member.p, layer)
    out.fc = member.fc
    return out
