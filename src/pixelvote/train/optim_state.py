"""Optimiser state as safetensors + JSON (no pickle), for ``train --resume``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pixelvote.errors import CheckpointError


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from pixelvote.models.checkpoint import save_weights

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, float] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = float(v)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"param_groups": json.dumps(groups), "scalars": json.dumps(scalars)}
    save_weights(path, tensors, metadata=meta)


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta.get("scalars", "{}"))
    except Exception as exc:
        raise CheckpointError(f"optimiser state is missing or corrupt ({exc})", path=path,
                              fix="start a new run with another --out (or delete this run folder "
                                  "first)") from None
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in scalars.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})
