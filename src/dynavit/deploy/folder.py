"""A whole menu to a folder: one file per path and ``menu.json``, what ``serve --runtime onnxruntime`` reads.

``menu.json`` holds what serving needs without the source model or the store: the model's
name, task, labels, input size and normalisation (the evaluation transform), and per path its
file, config, measured quality and costs as the store recorded them (``runtime.menu.Entry``
fields), and the parameters its sliced file holds. Paths that cannot be exported are listed
with the reason, not silently left out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dynavit.config import ExecConfig
from dynavit.deploy.export import FORMATS, check_format, write
from dynavit.deploy.slice import DeployError, parameter_count, path_module
from dynavit.errors import DynavitError
from dynavit.runtime.menu import Entry, Menu

MENU_FILE = "menu.json"
_RUN_TIME_ONLY = ("config", "shares", "residual", "ladder")  # measured where it runs, not shipped


def model_meta(dm: Any) -> dict[str, Any]:
    """What a runtime needs to decode and label like the model: task, labels, size, normalisation."""
    return {"model": str(dm.source), "family": dm.family, "task": dm.task, "input_size": list(dm.input_size),
            "mean": list(dm.mean), "std": list(dm.std), "crop_pct": dm.crop_pct,
            "id2label": {str(k): v for k, v in dm.id2label.items()}}


def entry_record(e: Entry) -> dict[str, Any]:
    fields = {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name not in _RUN_TIME_ONLY}
    return {"config": e.config.to_dict(), **fields}


def entry_from_record(r: dict[str, Any]) -> Entry:
    known = {f.name for f in dataclasses.fields(Entry)} - set(_RUN_TIME_ONLY)
    return Entry(config=ExecConfig.from_dict(r["config"]), **{k: v for k, v in r.items() if k in known})


def export_menu(store: str | Path, out: str | Path, model: Any = None, *, format: str = "onnx",
                device: str | None = None, progress: bool = False) -> Path:
    """Export every path of ``store``'s menu (its front, the model as measured) into ``out``; returns menu.json."""
    check_format(format)
    menu = Menu.from_store(store, model, device=device)
    return export_entries(menu.model, menu.entries, out, format=format, progress=progress)


def export_entries(dm: Any, entries: list[Entry], out: str | Path, *, format: str = "onnx",
                   progress: bool = False) -> Path:
    """Export ``entries`` of ``dm`` into folder ``out`` with their ``menu.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, skipped = [], []
    example = dm.example_input(2)
    for k, e in enumerate(tqdm(entries, desc="export", disable=not progress, dynamic_ncols=True)):
        try:
            module = path_module(dm, e.config)
            name = f"path-{k:02d}{FORMATS[format]}"
            write(module, example, out / name, format)
        except DeployError as err:
            skipped.append({"config": e.config.to_dict(), "why": str(err)})
            continue
        paths.append({"file": name, "parameters": parameter_count(module), **entry_record(e)})
    if not paths:
        raise DynavitError(f"no path of the menu could be exported: {skipped[0]['why']}")
    variants = {k: str(v.source) for k, v in getattr(dm, "variants", {}).items()}  # what variant=... paths ran on
    meta = {**model_meta(dm), "format": format, "paths": paths, "skipped": skipped, "variants": variants}
    target = out / MENU_FILE
    target.write_text(json.dumps(meta, indent=2))
    return target


def read_folder(folder: str | Path) -> dict[str, Any]:
    """``menu.json`` of an exported folder, checked."""
    path = Path(folder) / MENU_FILE
    if not path.is_file():
        raise DynavitError(f"{folder} is not an exported menu: it has no {MENU_FILE} (write one with "
                           "`dynavit export MODEL --store DB --out DIR`)")
    meta = json.loads(path.read_text())
    missing = [p["file"] for p in meta.get("paths", []) if not (Path(folder) / p["file"]).is_file()]
    if missing or not meta.get("paths"):
        raise DynavitError(f"{path} lists {missing[0]}, which is not in the folder" if missing
                           else f"{path} lists no paths")
    return meta
