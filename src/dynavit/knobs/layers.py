"""Layers every family shares: activations by config name and the width-sliced two-layer MLP."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.knobs.width import mlp

ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
}


def activation(act: str | nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A config's ``hidden_act`` name, or a module/callable as timm stores it."""
    if isinstance(act, str):
        if act not in ACTS:
            raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTS)})")
        return ACTS[act]
    return act


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` on the first ``hidden`` channels (ViT, Swin; SegFormer adds a conv)."""

    def __init__(self, src: nn.Module, act: str | nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = src.fc1, src.fc2
        self.act = activation(act)

    def forward(self, x: torch.Tensor, hidden: int, precision: str = "fp32") -> torch.Tensor:
        return mlp(x, self.fc1, self.fc2, hidden, self.act, precision)
