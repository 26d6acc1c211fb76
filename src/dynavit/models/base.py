"""What every family implementation provides to ``DynamicModel``.

A family model is dynavit's own forward pass of one architecture, built over the source
model's parameter tensors (the same ``nn.Parameter`` objects: nothing is copied). It reads
the current ``Plan`` at every forward; ``set_plan`` only stores it, so switching paths
costs a pointer assignment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynavit.config import ExecConfig, Plan, Space, resolve


class FamilyModel(nn.Module):
    """Base class: subclasses set ``space`` and define ``forward(pixel_values) -> logits``."""

    family: str = ""
    space: Space

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.config = getattr(source, "config", None)
        self.plan: Plan | None = None

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan

    def default_plan(self) -> Plan:
        return resolve(ExecConfig(), self.space)

    def importance_targets(self) -> dict[str, Any]:
        """Hook for calibration: the groups of channels/heads this family can reorder."""
        return {}


def resize_input(x: torch.Tensor, resolution: tuple[int, int] | None) -> torch.Tensor:
    """The ``resolution`` knob: resize the batch (antialiased bilinear) when it differs."""
    if resolution is None or tuple(x.shape[-2:]) == tuple(resolution):
        return x
    return torch.nn.functional.interpolate(x, size=resolution, mode="bilinear", align_corners=False, antialias=True)
