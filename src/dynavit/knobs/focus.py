"""Token-focused MLP width: the tokens the class token reads keep every channel, the others fewer.

A CLS-token ViT's prediction is read from the class token, which reads the patch tokens through
attention. Narrowing every token's MLP alike spends the error where it matters most; at the same
MACs, the class token and the fraction ``f`` of patch tokens it attends to most in the block
run the full MLP (n channels), and the other patch tokens run ``k'`` channels, chosen so that
the block's MLP MACs, plus the class token's attention when nothing else computes it (``t C``
MACs, the cost of ``t / 2`` channels of one token), never exceed those of ``k`` channels for every
token: ``(1 + m) n + (t - 1 - m) k' + t / 2 <= t k`` with ``m = round(f (t - 1))`` of the ``t`` tokens. ``m``
shrinks where ``k'`` would fall below ``k / 2``, and where not even the class token fits
the MLP runs uniform. Which ``f`` a model gets at each width (or none) is measured at calibration
(``compensation.choose_focus``); what it buys DeiT-tiny is in docs/results.md ("Focused MLP width").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dynavit.knobs.width import mlp


def fraction(table: tuple[tuple[float, float | None], ...], width: float) -> float | None:
    """The fraction of the (MLP width, fraction) pair nearest ``width`` (ties: the wider); None: not focused."""
    return min(table, key=lambda wf: (abs(wf[0] - width), -wf[0]))[1]


def split(t: int, k: int, n: int, fraction: float) -> tuple[int, int] | None:
    """(patch tokens at full width m, channels k' of the others) for ``t`` tokens; None: run uniform."""
    if k >= n or t < 3:
        return None
    floor, budget = max(1, k // 2), k * t - (t + 1) // 2  # the class token's attention paid first
    m_max = (budget - n - floor * (t - 1)) // (n - floor)
    m = min(round(fraction * (t - 1)), m_max, t - 2)
    if m < 0:
        return None
    return m, (budget - (1 + m) * n) // (t - 1 - m)


def focused_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, k: int, act: Callable[[torch.Tensor], torch.Tensor],
                cls_attention: torch.Tensor, fraction: float, precision: str = "fp32") -> torch.Tensor:
    """The MLP on (B, t, C) tokens, focused by the class token's (B, t - 1) attention (see the module docstring)."""
    t, c = int(x.shape[1]), int(x.shape[2])  # fixed for a path: constants to a tracer, the batch stays free
    parts = split(t, k, fc1.out_features, fraction)
    if parts is None:
        return mlp(x, fc1, fc2, k, act, precision)
    m, narrow = parts
    rank = torch.cat([torch.full_like(cls_attention[:, :1], float("inf")), cls_attention], dim=1)
    order = rank.topk(t, dim=1).indices[..., None]  # class token first, then by attention (a full TopK: ONNX has it)
    xs = x.gather(1, order.expand(-1, -1, c))
    full = mlp(xs[:, : 1 + m], fc1, fc2, fc1.out_features, act, precision)
    rest = mlp(xs[:, 1 + m:], fc1, fc2, narrow, act, precision)
    ys = torch.cat([full, rest], dim=1)
    return torch.zeros_like(ys).scatter(1, order.expand(-1, -1, ys.shape[-1]), ys)
