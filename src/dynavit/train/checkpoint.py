"""Resumable training checkpoints: safetensors for tensors, JSON for everything else, crash-safe.

A checkpoint folder holds ``model.safetensors`` (the module's state dict), ``optim.safetensors``
(every optimiser state tensor, keyed ``<param index>.<name>``), ``state.json`` (step, the
optimiser's scalar state and hyper-parameters, the run's recipe, the metrics so far) and, written
and fsync'd last, ``manifest.json`` (the step and each file's size and SHA-256). A folder is
*complete* when its manifest matches its files; a folder without a manifest is a save that was
cut short.

A save writes ``<name>.tmp``, moves the current checkpoint to ``<name>.old``, moves the new one
into place and only then removes ``<name>.old``: at every instant at least one complete
checkpoint exists on disk. ``recover`` (run before every load and save) puts the newest complete
one back at ``<name>`` and removes what is stale, so a run killed at any point of a save resumes
from the newest checkpoint that was fully written, without manual repair.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dynavit.errors import DynavitError

FILES = ("model.safetensors", "optim.safetensors", "state.json")
MANIFEST = "manifest.json"

#: Called with the name of each filesystem step of a save, after it is done (fault-injection tests).
fault_hook: Callable[[str], None] | None = None


def _done(step: str) -> None:
    if fault_hook is not None:
        fault_hook(step)


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk: a rename is durable only once its folder is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _siblings(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def save(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    """Write a checkpoint of ``model``, ``optimizer`` and ``state`` (which must hold ``step``) at ``folder``."""
    folder = Path(folder)
    tmp, old = _siblings(folder)
    if tmp.exists() or old.exists():  # an earlier save was interrupted: the newest complete one to ``folder``
        recover(folder)
    tmp.mkdir(parents=True)
    _done("tmp-created")
    _write_files(tmp, model, optimizer, state)
    if folder.exists():
        os.replace(folder, old)
        _fsync(folder.parent)
        _done("current-moved")
    os.replace(tmp, folder)
    _fsync(folder.parent)
    _done("new-moved")
    if old.exists():
        shutil.rmtree(old)
        _done("old-removed")
    return folder


def _write_files(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The checkpoint's files in ``tmp``, each fsync'd, the manifest last."""
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_dedupe(weights), str(tmp / "model.safetensors"))
    _done("model-written")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = v
    save_file(tensors, str(tmp / "optim.safetensors"))
    _done("optim-written")
    meta = {**state, "optim_scalars": scalars, "optim_groups": opt["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=float))
    _done("state-written")
    for f in FILES:
        _fsync(tmp / f)
    manifest = {"step": int(state["step"]),
                "files": {f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES}}
    with (tmp / MANIFEST).open("w") as fh:
        fh.write(json.dumps(manifest, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(tmp)
    _done("manifest-written")


def _dedupe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: tied weights are stored once per name as copies."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def completed_step(folder: str | Path, *, legacy: bool = True) -> int | None:
    """The step of the complete checkpoint at ``folder``, or None when it is missing or was cut short.

    A manifest that does not match its files is not a crash (the manifest is written last, after
    every file is on disk) but damage, and raises. With ``legacy``, a folder written before
    manifests existed counts as complete when it holds every file and its state parses (never
    true of a ``.tmp`` folder, whose state may be written before its tensors reach the disk).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return _legacy_step(folder) if legacy else None
    try:
        manifest = json.loads(mpath.read_text())
        files, step = manifest["files"], int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _corrupt(folder, f"its manifest is unreadable: {e}") from None
    for name, want in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["size"] or _sha256(path) != want["sha256"]:
            raise _corrupt(folder, f"{name} does not match its manifest")
    return step


def _legacy_step(folder: Path) -> int | None:
    if not all((folder / f).is_file() for f in FILES):
        return None
    try:
        return int(json.loads((folder / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _corrupt(folder: Path, why: str) -> DynavitError:
    return DynavitError(f"checkpoint {folder} is unreadable or corrupt ({why}); delete it to start over")


def recover(folder: str | Path) -> int | None:
    """Put the newest complete checkpoint among ``folder``, its ``.tmp`` and ``.old`` at ``folder``.

    Everything else there is stale (older, or cut short) and is removed, but only once the newest
    complete checkpoint is in place. Returns its step (None when there is none).
    """
    folder = Path(folder)
    tmp, old = _siblings(folder)
    steps = {p: completed_step(p, legacy=p != tmp) for p in (folder, tmp, old)}
    done = {p: s for p, s in steps.items() if s is not None}
    if not done:
        for p in (tmp, old):  # nothing complete: leftovers of saves that never finished
            if p.exists():
                shutil.rmtree(p)
        return None
    best = max(done, key=lambda p: (done[p], p == folder))  # a tie keeps the one already in place
    if best != folder:
        if folder.exists():
            shutil.rmtree(folder)  # older or incomplete: ``best`` is newer and complete
        os.replace(best, folder)
        _fsync(folder.parent)
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    return done[best]


def exists(folder: str | Path) -> bool:
    """Whether a complete checkpoint is at ``folder`` (after recovering from an interrupted save)."""
    return recover(folder) is not None


def load(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) in place; returns the saved state (step, recipe, ...)."""
    folder = Path(folder)
    recover(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        optim_tensors = load_file(str(folder / "optim.safetensors")) if optimizer is not None else {}
    except (OSError, ValueError, SafetensorError) as e:
        raise _corrupt(folder, str(e)) from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise DynavitError(f"checkpoint {folder} does not fit this model ({str(e).splitlines()[-1].strip()}); "
                           "use the model it was trained from") from None
    if missing or unexpected:
        raise DynavitError(f"checkpoint {folder} does not fit this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); use the model it was trained from")
    if optimizer is not None:
        _load_optimizer(optimizer, optim_tensors, state)
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any]
                    ) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    for key, v in state.pop("optim_scalars", {}).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("optim_groups")})
