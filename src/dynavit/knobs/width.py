"""Width knobs as weight views: "keep k" means "use the first k rows/columns".

Calibration orders channels and heads by importance once, so every slice here is a view of
the shared parameter (no copy, no gather, no allocation). Output-channel slices
(``weight[:k]``) are contiguous; input-channel slices (``weight[:, :k]``) are strided views
that BLAS reads with a leading dimension, also without a copy.

A calibration may also give a width-sliced layer a correction for the channels it no longer reads
(``knobs.compensate``); ``linear_in`` and ``merge_heads`` run it when there is one.

Every helper takes the block's ``precision``: fp32 runs the lines below unchanged, any other
precision runs the same slice of the layer's low-precision weights (``knobs.quant``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.knobs import compensate, quant

# Calibration observes the inputs of the width-sliced layers: the MLP hidden activation (input
# of ``linear_in``) and the per-head attention output (input of ``merge_heads``). A module-level
# hook keeps this family-agnostic; when no recorder is set it costs one global read per call.
_recorder: Callable[[nn.Module, torch.Tensor], None] | None = None


@contextmanager
def recording(fn: Callable[[nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(layer, input)`` for every width-sliced layer input while the context is open."""
    global _recorder
    previous, _recorder = _recorder, fn
    try:
        yield
    finally:
        _recorder = previous


def observing() -> bool:
    """True while calibration records; lets a family take a slower, observable route only then."""
    return _recorder is not None


def observe(layer: nn.Module, x: torch.Tensor) -> None:
    """Report ``layer``'s input to an active calibration recorder (MLP hidden: (..., k); heads: (B, h, N, d))."""
    if _recorder is not None:
        _recorder(layer, x)


def linear_out(x: torch.Tensor, lin: nn.Linear, k: int, offset: int = 0, precision: str = "fp32") -> torch.Tensor:
    """``lin`` restricted to ``k`` output features from ``offset`` (a fused qkv keeps q, k, v at offsets)."""
    if precision != "fp32":
        return quant.linear(x, lin, precision, offset, k, lin.in_features)
    if k == lin.out_features:
        return F.linear(x, lin.weight, lin.bias)
    rows = slice(offset, offset + k)
    return F.linear(x, lin.weight[rows], None if lin.bias is None else lin.bias[rows])


def linear_in(x: torch.Tensor, lin: nn.Linear, k: int, precision: str = "fp32") -> torch.Tensor:
    """``lin`` reading only its first ``k`` input features (x has k features), compensated if calibrated so."""
    observe(lin, x)
    if k < lin.in_features and (fixed := compensate.corrected(lin, k, precision)) is not None:
        return fixed(x)
    if precision != "fp32":
        return quant.linear(x, lin, precision, 0, lin.out_features, k)
    return F.linear(x, _columns(lin, k), lin.bias)


def _columns(lin: nn.Linear, k: int) -> torch.Tensor:
    return lin.weight if k == lin.in_features else lin.weight[:, :k]


def mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, k: int,
        act: Callable[[torch.Tensor], torch.Tensor], precision: str = "fp32") -> torch.Tensor:
    """Two-layer MLP with ``k`` hidden channels."""
    return linear_in(act(linear_out(x, fc1, k, precision=precision)), fc2, k, precision)


def heads_of(x: torch.Tensor, lin: nn.Linear, heads: int, head_dim: int, offset: int = 0,
             precision: str = "fp32") -> torch.Tensor:
    """Project (B, N, C) to (B, heads, N, head_dim) with the first ``heads`` heads of ``lin`` (from ``offset``)."""
    b, n, _ = x.shape
    return linear_out(x, lin, heads * head_dim, offset, precision).view(b, n, heads, head_dim).transpose(1, 2)


def merge_heads(out: torch.Tensor, proj: nn.Linear, precision: str = "fp32") -> torch.Tensor:
    """(B, h, N, d) attention output through the output projection's first h*d input columns."""
    b, h, n, d = out.shape
    observe(proj, out)
    merged = out.transpose(1, 2).reshape(b, n, h * d)
    if h * d < proj.in_features and (fixed := compensate.corrected(proj, h * d, precision)) is not None:
        return fixed(merged)
    if precision != "fp32":
        return quant.linear(merged, proj, precision, 0, proj.out_features, h * d)
    return F.linear(merged, _columns(proj, h * d), proj.bias)
