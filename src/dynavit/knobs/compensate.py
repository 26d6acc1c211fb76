"""Training-free compensation: what removed channels, heads or sub-layers used to add, restored.

A width knob keeps the first k input channels of a layer (an MLP's ``fc2``, an attention output
projection). The other n - k channels did not produce zeros: they produced a mean and a part
that correlates with the kept channels. From the full model's input statistics of the layer
(mean mu and covariance S, measured once at calibration on unlabelled images) two corrections
are closed-form:

- ``bias``: add the removed channels' mean contribution to the bias,
  ``b' = b + W_r mu_r`` (the layer's weights are unchanged, a vector per (layer, k));
- ``matrix``: also predict the removed channels from the kept ones by least squares,
  ``h_r ~ mu_r + A (h_k - mu_k)`` with ``A = S_rk (S_kk + ridge)^-1``, and fold the prediction
  into the kept weights: ``W_k' = W_k + W_r A``, ``b' = b + W_r (mu_r - A mu_k)``.

A skipped sub-layer adds back its mean output over the calibration images (for CLS-token models
one mean for the CLS token and one for the patch tokens). A dropped SegFormer decoder branch is
the same least-squares problem on the decoder's ``fuse`` layer, whose input is all branches' maps
side by side: the dropped branches' columns are predicted from the kept ones (``columns``).

The corrected (out x k) weights of a (layer, k) are solved on the first forward that runs them and
kept (``counts["solved"]``): switching between paths afterwards does no work, as with the int8
packs; the full width (k = n) is never corrected, so the default path is the model unchanged.
Stores live outside the module tree (a weak dictionary keyed by layer), so a deep copy, a
``state_dict`` or an export never carries them unless asked (``deploy.slice`` bakes them in).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from dynavit.knobs import quant

METHODS = ("none", "bias", "matrix")
RIDGE = 1e-3  # of the kept channels' mean variance: keeps S_kk invertible for dead or duplicate channels

counts = {"solved": 0}  # (layer, k, precision) corrections made so far; a test checks switching makes none


@dataclass
class LayerStats:
    """One layer's input statistics on the full path, in the calibrated channel order."""

    mean: torch.Tensor  # (n,)
    cov: torch.Tensor | None  # (n, n); None for ``bias``
    method: str
    ridge: float = RIDGE
    solved: dict[tuple, Any] = field(default_factory=dict)  # (k, precision, version) -> callable; ``columns``' (w, b)
    solved_bytes: int = 0  # what the solved corrections hold (int8: weights + fp32 bias, as packed)


_layers: weakref.WeakKeyDictionary[nn.Module, LayerStats] = weakref.WeakKeyDictionary()
_skips: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()  # sub-layer -> mean
_focus: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()  # MLP -> (width, fraction) pairs


def install(layer: nn.Module, stats: LayerStats) -> None:
    _layers[layer] = stats


def install_skip(sublayer: nn.Module, mean: torch.Tensor) -> None:
    """``mean``: (1, C), or (2, C) = (CLS token, patch tokens) for CLS-token models."""
    _skips[sublayer] = mean


def install_focus(mlp: nn.Module, table: tuple[tuple[float, float | None], ...] | None) -> None:
    """Narrowed, ``mlp`` keeps full width for the class token and a fraction of the patch tokens, per
    (MLP width, fraction) pair of ``table`` (``knobs.focus``); None: every token narrowed alike."""
    if table is None:
        _focus.pop(mlp, None)
    else:
        _focus[mlp] = table


def focus(mlp: nn.Module) -> tuple[tuple[float, float | None], ...] | None:
    """The (MLP width, fraction) pairs ``install_focus`` gave ``mlp`` (None: none)."""
    return _focus.get(mlp)


def skip_mean(sublayer: nn.Module) -> torch.Tensor | None:
    """The mean a skipped ``sublayer`` adds back (None when it has none)."""
    return _skips.get(sublayer)


def uninstall(module: nn.Module) -> None:
    """Remove every correction of ``module``'s layers (the uncompensated knobs again)."""
    for m in module.modules():
        _layers.pop(m, None)
        _skips.pop(m, None)
        _focus.pop(m, None)


def active(module: nn.Module) -> bool:
    return any(m in _layers or m in _skips or m in _focus for m in module.modules())


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """(out, in) view of a linear layer's or a 1x1 convolution's weight."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def solve(w: torch.Tensor, b: torch.Tensor | None, stats: LayerStats, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected (out, k) weights and (out,) bias for keeping the first k of w's input channels."""
    n = stats.mean.shape[0]
    return solve_columns(w, b, stats, torch.arange(k), torch.arange(k, n))


def solve_columns(w: torch.Tensor, b: torch.Tensor | None, stats: LayerStats, keep: torch.Tensor,
                  drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected (out, len(keep)) weights and (out,) bias when w's input columns ``drop`` are removed."""
    w64 = w.detach().double()
    mu = stats.mean.to(w64)
    bias = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None else b.detach().double()
    keep, drop = keep.to(w.device), drop.to(w.device)
    w_k, w_r = w64[:, keep], w64[:, drop]
    if stats.method == "matrix" and stats.cov is not None:
        s = stats.cov.to(w64)
        s_kk = s[keep][:, keep]
        s_kk = s_kk + stats.ridge * s_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep)).to(w64)
        a = torch.linalg.solve(s_kk, s[keep][:, drop]).T  # (r, k)
        w_k = w_k + w_r @ a
        bias = bias + w_r @ (mu[drop] - a @ mu[keep])
    else:
        bias = bias + w_r @ mu[drop]
    return w_k.to(w.dtype).contiguous(), bias.to(w.dtype)


def columns(layer: nn.Module, rows: int, keep: list[range], drop: list[range]
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``layer``'s first ``rows`` outputs on the input columns ``keep``, the columns ``drop`` predicted from them.

    (rows, |keep|) weights and (rows,) bias, solved once per (rows, columns, weights) outside any
    dispatch mode (a MAC count counts the path); None when the layer has no statistics installed.
    """
    stats = _layers.get(layer)
    if stats is None or not drop:
        return None
    key = (rows, tuple((r.start, r.stop) for r in keep), tuple((r.start, r.stop) for r in drop), layer.weight._version)
    fixed = stats.solved.get(key)
    if fixed is None:
        with _disable_current_modes(), torch.no_grad():
            fixed = stats.solved[key] = solve_columns(weight_matrix(layer)[:rows], None, stats,
                                                      torch.tensor([c for r in keep for c in r]),
                                                      torch.tensor([c for r in drop for c in r]))
        counts["solved"] += 1
        stats.solved_bytes += sum(t.numel() * t.element_size() for t in fixed)
    return fixed


def weights(layer: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The corrected (out, k) weights and bias of ``layer`` on its first k inputs (None: no correction)."""
    stats = _layers.get(layer)
    if stats is None or stats.method == "none" or k >= stats.mean.shape[0]:
        return None
    return solve(weight_matrix(layer), layer.bias, stats, k)


def copy_to(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (a deep copy of ``src``, same module order) ``src``'s corrections."""
    for a, b in zip(src.modules(), dst.modules(), strict=True):
        if a in _layers:
            _layers[b] = _layers[a]
        if a in _skips:
            _skips[b] = _skips[a]
        if a in _focus:
            _focus[b] = _focus[a]


def forget(layer: nn.Module) -> None:
    """Drop one layer's correction (its weights now hold it, as a deployed path's do)."""
    _layers.pop(layer, None)


def corrected(layer: nn.Module, k: int, precision: str = "fp32") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer on its first k input channels, corrected; None when it has no correction (or k is all)."""
    stats = _layers.get(layer)
    if stats is None or stats.method == "none" or k >= stats.mean.shape[0]:
        return None
    key = (k, precision, layer.weight._version)  # weights changed since (training): solve again
    fn = stats.solved.get(key)
    if fn is None:
        fn = stats.solved[key] = _make(layer, stats, k, precision)
        counts["solved"] += 1
    return fn


def _make(layer: nn.Module, stats: LayerStats, k: int, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # solved outside any active dispatch mode: a MAC counter running the path's first forward
    # must count the path, not the one-off solve
    with _disable_current_modes(), torch.no_grad():
        w, b = solve(weight_matrix(layer), layer.bias, stats, k)
    per_weight = quant.BYTES_PER_WEIGHT[precision]
    stats.solved_bytes += w.numel() * per_weight + b.numel() * (4 if precision == "int8" else per_weight)
    if precision == "int8":
        packed = quant.pack_matrix(w, b)
        return lambda x: quant.run_packed(x, packed)
    if precision != "fp32":
        dtype = quant.HALF[precision]
        wh, bh = w.to(dtype), b.to(dtype)
        return lambda x: F.linear(x.to(dtype), wh, bh).to(x.dtype)
    return lambda x: F.linear(x, w, b)


def skipped(sublayer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` plus the mean output of a sub-layer that did not run (``x`` unchanged without a correction)."""
    mean = _skips.get(sublayer)
    if mean is None:
        return x
    if mean.shape[0] == 1:
        return x + mean[0]
    out = x + mean[1]
    out[:, 0] += mean[0] - mean[1]
    return out


def skipped_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` past a block that did not run: both of its sub-layers' means (``block.attn``, ``block.mlp``)."""
    return skipped(block.mlp, skipped(block.attn, x))


def held_bytes(module: nn.Module) -> dict[str, int]:
    """Memory the corrections hold beside the weights: statistics, and solved weights per width."""
    out = {"statistics": 0, "solved": 0, "n_solved": 0}
    for m in module.modules():
        st, mean = _layers.get(m), _skips.get(m)
        if mean is not None:
            out["statistics"] += mean.numel() * mean.element_size()
        if st is not None:
            out["statistics"] += sum(t.numel() * t.element_size() for t in (st.mean, st.cov) if t is not None)
            out["n_solved"] += len(st.solved)
            out["solved"] += st.solved_bytes
    return out
