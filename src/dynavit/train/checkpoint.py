"""Resumable training checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint folder holds ``model.safetensors`` (the module's state dict), ``optim.safetensors``
(every optimiser state tensor, keyed ``<param index>.<name>``) and ``state.json`` (step, the
optimiser's scalar state and hyper-parameters, the run's recipe, the metrics so far). It is
written to a temporary folder and renamed into place, so a run killed while saving leaves the
previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dynavit.errors import DynavitError

FILES = ("model.safetensors", "optim.safetensors", "state.json")


def save(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_dedupe(weights), str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = v
    save_file(tensors, str(tmp / "optim.safetensors"))
    meta = {**state, "optim_scalars": scalars, "optim_groups": opt["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=float))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def _dedupe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: tied weights are stored once per name as copies."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def exists(folder: str | Path) -> bool:
    return all((Path(folder) / f).is_file() for f in FILES)


def load(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) in place; returns the saved state (step, recipe, ...)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        optim_tensors = load_file(str(folder / "optim.safetensors")) if optimizer is not None else {}
    except (OSError, ValueError, SafetensorError) as e:
        raise DynavitError(f"checkpoint {folder} is unreadable or corrupt ({e}); delete it to start over") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise DynavitError(f"checkpoint {folder} does not fit this model ({str(e).splitlines()[-1].strip()}); "
                           "use the model it was trained from") from None
    if missing or unexpected:
        raise DynavitError(f"checkpoint {folder} does not fit this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); use the model it was trained from")
    if optimizer is not None:
        per_param: dict[int, dict[str, Any]] = {}
        for key, v in optim_tensors.items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = v
        for key, v in state.pop("optim_scalars", {}).items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = v
        optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("optim_groups")})
    return state
