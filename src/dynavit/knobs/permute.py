"""Weight permutations that leave a layer pair's function unchanged (calibration's reordering).

Permuting the hidden units between two layers (the rows of the first, the columns of the
second, and any per-unit tensor in between) changes nothing the pair computes, so calibration
can put the most important units first and every width knob becomes a prefix view. Families
say WHICH tensors belong to a unit (their ``permute``); the mechanics live here, once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def permute_(t: torch.Tensor | None, idx: torch.Tensor, dim: int = 0) -> None:
    """Reorder ``t`` along ``dim`` in place (same storage): ``t = t.index_select(dim, idx)``."""
    if t is not None:
        with torch.no_grad():
            t.copy_(t.index_select(dim, idx.to(t.device)))


def permute_units(perm: torch.Tensor, producers: Iterable[nn.Module], consumer: nn.Module) -> None:
    """Hidden units in ``perm`` order: rows (and biases) of every producer, input columns of the consumer.

    Producers are the layers that write one channel per unit (an MLP's fc1, SegFormer's
    depthwise conv); the consumer reads them (fc2).
    """
    for layer in producers:
        permute_(layer.weight, perm)
        permute_(layer.bias, perm)
    permute_(consumer.weight, perm, dim=1)


def permute_heads(perm: torch.Tensor, parts: Iterable[tuple[nn.Linear, int]], out: nn.Linear, head_dim: int,
                  per_head: Iterable[tuple[torch.Tensor | None, int]] = ()) -> None:
    """Heads in ``perm`` order: q/k/v rows (``parts``: projection and row offset, for a fused qkv),
    output-projection columns, and any per-head tensor (``per_head``: tensor and the dim of its heads)."""
    dev = out.weight.device
    rows = (perm.to(dev)[:, None] * head_dim + torch.arange(head_dim, device=dev)[None, :]).reshape(-1)
    width = len(rows)
    for lin, off in parts:
        permute_(lin.weight[off:off + width], rows)
        permute_(None if lin.bias is None else lin.bias[off:off + width], rows)
    permute_(out.weight, rows, dim=1)
    for t, dim in per_head:
        permute_(t, perm, dim=dim)
