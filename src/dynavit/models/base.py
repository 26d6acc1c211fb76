"""What every family implementation provides to ``DynamicModel``.

A family model is dynavit's own forward pass of one architecture, built over the source
model's parameter tensors (the same ``nn.Parameter`` objects: nothing is copied). It reads
the current ``Plan`` at every forward; ``set_plan`` only stores it, so switching paths
costs a pointer assignment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynavit.config import ExecConfig, Plan, Space, resolve


class FamilyModel(nn.Module):
    """Base class: subclasses set ``space`` and define ``forward(pixel_values) -> logits``."""

    family: str = ""
    space: Space
    supports_deadline: bool = False  # the forward consults ``self.deadline`` before each block

    deadline: Any = None  # a ``dynavit.deadline.Deadline`` for the next forward, set by the controller

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.config = getattr(source, "config", None)
        self.plan: Plan | None = None

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan

    def default_plan(self) -> Plan:
        return resolve(ExecConfig(), self.space)


def resize_input(x: torch.Tensor, resolution: tuple[int, int] | None) -> torch.Tensor:
    """The ``resolution`` knob: resize the batch (antialiased bilinear) when it differs."""
    if resolution is None or tuple(x.shape[-2:]) == tuple(resolution):
        return x
    return torch.nn.functional.interpolate(x, size=resolution, mode="bilinear", align_corners=False, antialias=True)


class DerivedCache:
    """Tensors computed from a parameter (interpolated position embeddings, gathered biases).

    Cached for inference, keyed by the parameter's version counter, dtype and device, so that
    training or reloading the parameter invalidates them; bypassed while autograd records, so
    the computation stays in the graph and the model remains trainable.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, param: torch.Tensor, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            return make()
        full = (key, param._version, param.dtype, param.device)
        value = self._store.get(full)
        if value is None:
            self._store = {k: v for k, v in self._store.items() if k[1:] == full[1:]}  # drop stale versions
            value = self._store[full] = make()
        return value


def interpolate_grid(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(1, gh*gw, C) grid embeddings resized bicubically to ``size`` (transformers' interpolation)."""
    dim = tokens.shape[-1]
    g = tokens.reshape(1, *grid, dim).permute(0, 3, 1, 2)
    g = torch.nn.functional.interpolate(g, size=size, mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(1, -1, dim)
