"""Where the offline development assets live (real models and data beside the repo).

Resolution order: the ``DYNAVIT_ASSETS`` environment variable, then ``../shared/assets``
relative to the repository root. Users on an online machine never need these: the demo
falls back to Hugging Face hub ids.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "DYNAVIT_ASSETS"
DEIT_TINY_HUB_ID = "facebook/deit-tiny-patch16-224"


def assets_dir() -> Path | None:
    """The assets folder if it exists, else None."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    p = repo_root.parent / "shared" / "assets"
    return p if p.is_dir() else None


def deit_tiny_source() -> str:
    """Local DeiT-tiny folder when the assets are present, else the hub id."""
    root = assets_dir()
    local = root / "models" / "deit-tiny-patch16-224" if root else None
    return str(local) if local and (local / "config.json").is_file() else DEIT_TINY_HUB_ID
