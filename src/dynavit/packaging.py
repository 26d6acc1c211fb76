"""A calibrated model shipped like a Hugging Face model: ``save_pretrained`` and its reading back.

The folder is the source model's own (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), so transformers loads it too; the weights are stored in their
calibrated order. ``dynavit.json`` says what dynavit adds: the calibration (its permutations and
rankings, in ``calibration/``) and any multiplexed models (``mux<N>/``). Reading it back applies
nothing to the weights (they are already in order) and re-attaches the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from dynavit.calibrate import Calibration, fingerprint
from dynavit.errors import DynavitError
from dynavit.multiplex import save_multiplexer

MANIFEST = "dynavit.json"
FORMAT = 1


def write_pretrained(dm: Any, folder: Path, *, half: bool = False) -> Path:
    """Write ``dm`` (a DynamicModel) to ``folder``; see the module docstring.

    ``half`` stores floating-point weights as fp16 (half the bytes); ``dynavit.load`` brings them
    back as fp32. A calibration is recorded with the fingerprint of the weights as saved (order-
    insensitive, so unchanged unless the model was trained after calibrating).
    """
    if not hasattr(dm.model, "save_pretrained"):
        raise DynavitError(f"save_pretrained writes Hugging Face folders; {dm.source} ({dm.family}) is not a "
                           "transformers model: save its state_dict() instead")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in dm.model.state_dict().items()}
    dm.model.save_pretrained(str(folder), state_dict=state)
    h, w = dm.input_size
    pre = {**dm.preprocessor, "image_mean": list(dm.mean), "image_std": list(dm.std), "crop_pct": dm.crop_pct,
           "size": {"height": h, "width": w}, "do_resize": True, "do_normalize": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    manifest: dict[str, Any] = {"format": FORMAT, "saved_from": provenance(dm.source, folder),
                                "calibration": None, "multiplexers": {}}
    if dm.calibration is not None:
        now = fingerprint(dm.base_module, stored_as=torch.float16 if half else None)
        calib = dm.calibration
        calib = calib if calib.fingerprint == now else dataclasses.replace(calib, fingerprint=now)
        calib.save(folder / "calibration")
        manifest["calibration"] = "calibration"
    for n, mux in sorted(dm.multiplexers.items()):
        save_multiplexer(mux, folder / f"mux{n}")
        manifest["multiplexers"][str(n)] = f"mux{n}"
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def provenance(source: Any, folder: Path) -> str:
    """Where the model came from, as the manifest records it: a hub id as given, a local folder
    relative to the written one, so the manifest names no machine's absolute paths."""
    path = Path(str(source))
    if not path.exists():
        return str(source)
    return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()


def read_extras(dm: Any, folder: Path) -> None:
    """Re-attach what ``write_pretrained`` added, when ``folder`` is such a folder (else nothing)."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DynavitError(f"cannot read {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DynavitError(f"{path} has format {manifest.get('format')!r}; this dynavit reads format {FORMAT}")
    if manifest.get("calibration"):
        dm.calibration = Calibration.load(folder / manifest["calibration"])  # the weights are already in order
        if dm.calibration.compensation is not None:
            dm.calibration.compensation.install(dm.base_module)
    for sub in manifest.get("multiplexers", {}).values():
        dm.add_multiplexer(folder / sub)
