"""Unit importance for calibration: how much each MLP channel, head or decoder channel matters.

Fed by the width recorder (``knobs.width.observe``) while the full model runs on calibration
images. Criteria (all label-free):
- ``magnitude``: activation-weighted magnitude. MLP channel j: E|h_j| * ||W_fc2[:, j]||;
  head h: E||o_h W_o[:, h]^T|| (the head's contribution to the block output).
- ``variance``: what a removed unit leaves once its mean is restored (``knobs.compensate``):
  Var(h_j) * ||W_fc2[:, j]||^2; head h: E||c_h - E c_h||^2 of its contribution c_h.
- ``taylor``: first-order Taylor estimate of the loss change when a unit is removed,
  |E[sum a * dL/da]| over the unit's activations a, with L the cross-entropy against the
  full model's own predictions (pseudo-labels).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.knobs.width import recording

CRITERIA = ("magnitude", "variance", "taylor")


class _Stats:
    """Importance accumulators fed by the width recorder (``knobs.width.observe``).

    Groups: per block, MLP hidden channels (input of fc2) and heads (per-head attention output,
    (B, h, N, d), before the output projection); for a decoder (SegFormer), each branch's
    ``linear_c`` output channels and the fused channels entering the classifier.
    """

    def __init__(self, model: nn.Module, criterion: str) -> None:
        blocks = model.blocks
        self.blocks, self.taylor, self.variance = blocks, criterion == "taylor", criterion == "variance"
        self.sums: dict[tuple[str, int], list] = {}  # variance: (count, sum, sum of squares) per group
        self.route: dict[int, tuple[str, int]] = {}
        for i, b in enumerate(blocks):
            self.route[id(b.mlp.fc2)] = ("mlp", i)
            self.route[id(b.attn.o)] = ("heads", i)
        self.scores: dict[str, list[torch.Tensor]] = {
            "mlp": [torch.zeros(b.mlp.fc2.in_features) for b in blocks],
            "heads": [torch.zeros(b.attn.num_heads) for b in blocks],
        }
        self.decoder = model.decoder
        if self.decoder is not None:
            for i, lin in enumerate(self.decoder.linear_c):
                self.route[id(lin)] = ("branch", i)
            self.route[id(self.decoder.classifier)] = ("fuse", 0)
            self.scores["branch"] = [torch.zeros(lin.out_features) for lin in self.decoder.linear_c]
            self.scores["fuse"] = [torch.zeros(self.decoder.width)]
        self.saved: list[tuple[str, int, torch.Tensor]] = []

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> None:
        hit = self.route.get(id(layer))
        if hit is None or (hit[0] == "heads" and x.dim() != 4):
            return
        kind, i = hit
        if self.taylor:
            x.retain_grad()
            self.saved.append((kind, i, x))
            return
        a = x.detach()
        if kind == "heads":
            b, nh, n, d = a.shape
            w = self.blocks[i].attn.o.weight.detach()[:, : nh * d].reshape(-1, nh, d)  # (C, h, d)
            contrib = torch.einsum("bhnd,chd->bhnc", a, w)
            if self.variance:  # per head: count, sum of contributions (h, C), sum of squared norms (h,)
                self._accumulate(kind, i, b * n, contrib.sum(dim=(0, 2)), contrib.square().sum(dim=(0, 2, 3)))
            else:
                self.scores["heads"][i] += contrib.norm(dim=-1).mean(dim=(0, 2)).cpu()
            return
        if self.variance:
            flat = _channels_last(a, kind).double()
            self._accumulate(kind, i, len(flat), flat.sum(0), flat.square().sum(0))
            return
        self.scores[kind][i] += _channel_mean_abs(a, kind).cpu() * self._out_weight_norm(kind, i).cpu()

    def _accumulate(self, kind: str, i: int, n: int, s1: torch.Tensor, s2: torch.Tensor) -> None:
        acc = self.sums.setdefault((kind, i), [0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + n, acc[1] + s1.double().cpu(), acc[2] + s2.double().cpu()

    def collect_variance(self) -> None:
        """Variance scores from the sums: E||c||^2 - ||E c||^2 per head; Var(h_j) ||w_j||^2 per channel."""
        for (kind, i), (n, s1, s2) in self.sums.items():
            mean = s1 / n
            if kind == "heads":
                self.scores[kind][i] = (s2 / n - mean.square().sum(-1)).float()
            else:
                var = (s2 / n - mean.square()).clamp_min(0)
                self.scores[kind][i] = (var * self._out_weight_norm(kind, i).double().cpu().square()).float()

    def _out_weight_norm(self, kind: str, i: int) -> torch.Tensor:
        """Norm of the weights each channel feeds: how much a unit of it moves the next layer."""
        if kind == "mlp":
            return self.blocks[i].mlp.fc2.weight.detach().norm(dim=0)
        dec = self.decoder
        if kind == "branch":
            return dec.fuse.weight.detach()[:, dec.branch_columns(i)].reshape(dec.width, -1).norm(dim=0)
        return dec.classifier.weight.detach().reshape(dec.classifier.out_channels, -1).norm(dim=0)

    def collect_taylor(self) -> None:
        for kind, i, x in self.saved:
            if x.grad is None:
                continue
            s = (x * x.grad).detach()
            if kind == "heads":
                self.scores["heads"][i] += s.sum(dim=(0, 2, 3)).abs().cpu()
            else:
                self.scores[kind][i] += _channel_sum(s, kind).abs().cpu()
        self.saved.clear()


def _channels_last(a: torch.Tensor, kind: str) -> torch.Tensor:
    """(samples, channels): last dim for tokens (B, N, C), dim 1 for maps (B, C, H, W)."""
    if kind == "mlp":
        return a.reshape(-1, a.shape[-1])
    return a.transpose(0, 1).reshape(a.shape[1], -1).T


def _channel_mean_abs(a: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean |activation| per channel."""
    return _channels_last(a, kind).abs().mean(0)


def _channel_sum(a: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mlp":
        return a.reshape(-1, a.shape[-1]).sum(0)
    return a.transpose(0, 1).reshape(a.shape[1], -1).sum(1)


def _pseudo_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own argmax (per pixel for segmentation)."""
    return F.cross_entropy(logits, logits.detach().argmax(1))


def scores(dm: Any, batches: Sequence[torch.Tensor], criterion: str, bar: Any = None
           ) -> dict[str, list[torch.Tensor]]:
    """Per group ("mlp", "heads", "branch", "fuse"), one importance score per unit, per block."""
    stats = _Stats(dm.module, criterion)
    for x in counted(batches, bar):
        if criterion == "taylor":
            with torch.enable_grad(), recording(stats):
                _pseudo_loss(dm(x)).backward()
            stats.collect_taylor()
        else:
            with torch.no_grad(), recording(stats):
                dm(x)
    dm.module.zero_grad(set_to_none=True)
    stats.collect_variance()
    return stats.scores


def counted(batches: Sequence[torch.Tensor], bar: Any) -> Iterator[torch.Tensor]:
    """The batches, each counted on the progress bar once its forward pass is done."""
    for x in batches:
        yield x
        if bar is not None:
            bar.update(len(x))


