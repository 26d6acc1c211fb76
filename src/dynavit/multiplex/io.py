"""Multiplexed models on disk: ``multiplex.json`` (structure) + ``model.safetensors`` (all weights).

A multiplexed model is loaded *beside* its single-image base model (``DynamicModel.add_multiplexer``):
the base provides the ViT structure to rebuild, the folder every weight of the multiplexed copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from dynavit.errors import DynavitError
from dynavit.multiplex.models import MuxModel, build

SPEC, WEIGHTS = "multiplex.json", "model.safetensors"


def save_multiplexer(model: MuxModel, folder: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write the model (and a markdown card of ``card``) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / WEIGHTS))
    (folder / SPEC).write_text(json.dumps({**model.spec(), "num_labels": model.num_labels}, indent=2))
    if card:
        lines = [f"# {card.get('name', folder.name)}", "", "Multiplexed model trained by `dynavit train "
                 "--mode multiplex`; attach it with `DynamicModel.add_multiplexer`.", ""]
        lines += [f"- **{k}**: {v}" for k, v in card.items() if k != "name"]
        (folder / "README.md").write_text("\n".join(lines) + "\n")
    return folder


def load_multiplexer(folder: str | Path, base: Any) -> MuxModel:
    """The multiplexed model saved in ``folder``, rebuilt on ``base`` (its single-image ViT)."""
    folder = Path(folder)
    if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
        raise DynavitError(f"{folder} is not a multiplexed model folder (expected {SPEC} and {WEIGHTS})")
    spec = json.loads((folder / SPEC).read_text())
    spec.pop("num_labels", None)
    arch = spec.pop("arch")
    model = build(base, arch, **spec)
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except (RuntimeError, SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise DynavitError(f"{folder} does not fit this base model ({first}); attach it to the model it was "
                           "trained from") from None
    return model.eval()
