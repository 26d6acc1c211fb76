"""Helpers shared by the execution-path tests of every family."""

from __future__ import annotations

import torch

from dynavit.config import ExecConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the acceptance measure for reproducing a source model."""
    return float((a - b).norm() / b.norm())


def ref_logits(hf, x: torch.Tensor, **kw) -> torch.Tensor:
    """Logits of a transformers model, without autograd."""
    with torch.no_grad():
        return hf(pixel_values=x, **kw).logits


def ours(dm, x: torch.Tensor, cfg: ExecConfig | None = None) -> torch.Tensor:
    """Logits of a DynamicModel on ``cfg`` (default path when None)."""
    dm.configure(cfg or ExecConfig())
    with torch.no_grad():
        return dm(x)
