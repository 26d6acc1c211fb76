"""What every model family provides: the contract between a family file and the rest of dynavit.

A family model is dynavit's own forward pass of one architecture, built over the source
model's parameter tensors (the same ``nn.Parameter`` objects: nothing is copied). It reads
the current ``Plan`` at every forward; ``set_plan`` only stores it, so switching paths costs
a pointer assignment.

A family file owns everything about its family (``models/registry.py`` lists the files):

- ``unsupported(source)``: "" when the family can run this loaded source model, else why not;
- ``default_input_size(source, preprocessor)``: the size the model was trained at;
- ``space``: the knobs and their legal values (``size_multiple`` is the input-size rule);
- ``blocks`` (and ``decoder``, when there is one): what calibration observes;
- ``permute(perms)``: calibration's weight reordering;
- ``begin`` / ``step`` / ``end`` / ``prefix_key``: the forward in block steps, so that a sweep
  can reuse the activations two paths share and a deadline can drop blocks between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynavit.config import ExecConfig, Plan, Space, resolve

Perms = dict[str, list[torch.Tensor]]  # group ("mlp", "heads", "branch", "fuse") -> one permutation per unit


class FamilyModel(nn.Module):
    """Base class of the family implementations (see the module docstring for the contract)."""

    family: str = ""
    space: Space
    steps: bool = False  # runs in block steps (``begin``/``step``/``end``): prefix reuse works on it
    supports_deadline: bool = False  # the forward consults ``self.deadline`` between blocks

    deadline: Any = None  # a ``dynavit.deadline.Deadline`` for the next forward, set by the runner

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.config = getattr(source, "config", None)
        self.plan: Plan | None = None
        self.decoder: nn.Module | None = None  # a dense-prediction head with width knobs (SegFormer)

    # ---- what the registry asks before building one ---------------------------------------------
    @classmethod
    def unsupported(cls, source: nn.Module) -> str:
        """Why this family cannot run ``source`` ("" when it can)."""
        return f"{cls.__name__} declares no source models it runs"

    @classmethod
    def default_input_size(cls, source: nn.Module, preprocessor: dict[str, Any]) -> tuple[int, int]:
        """The input size the model was trained at: ``config.image_size`` unless a family knows better."""
        s = source.config.image_size
        return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))

    # ---- paths ----------------------------------------------------------------------------------
    def set_plan(self, plan: Plan) -> None:
        self.plan = plan

    def default_plan(self) -> Plan:
        return resolve(ExecConfig(), self.space)

    def permute(self, perms: Perms) -> None:
        """Reorder units in place so each group's most important units come first (calibration)."""
        with torch.no_grad():
            for blk, mp, hp in zip(self.blocks, perms["mlp"], perms["heads"], strict=True):
                blk.permute(mp, hp)

    # ---- the forward in block steps -------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        carry = self.begin(pixel_values)
        deadline = self.deadline
        for i in range(len(self.blocks)):
            dropped = deadline is not None and deadline.skip(i, self.plan)
            carry = self.drop(carry, i) if dropped else self.step(carry, i)
        out = self.end(carry)
        if deadline is not None:
            deadline.finish()
        return out

    def begin(self, pixel_values: torch.Tensor) -> Any:
        """Everything before block 0; returns the carry ``step`` takes."""
        raise TypeError(f"{type(self).__name__} does not run in block steps")

    def step(self, carry: Any, i: int) -> Any:
        """Block ``i`` under the current plan. Never modifies ``carry`` in place: a sweep may keep it."""
        raise TypeError(f"{type(self).__name__} does not run in block steps")

    def drop(self, carry: Any, i: int) -> Any:
        """Block ``i`` dropped by a deadline (``supports_deadline`` models): what ``skip_keep_tokens`` runs."""
        raise TypeError(f"{type(self).__name__} does not drop blocks")

    def end(self, carry: Any) -> torch.Tensor:
        """Everything after the last block: the logits."""
        raise TypeError(f"{type(self).__name__} does not run in block steps")

    def prefix_key(self, plan: Plan, depth: int) -> tuple:
        """Everything that decides the carry after ``depth`` blocks under ``plan`` (equal keys: equal carries)."""
        return plan.resolution, plan.blocks[:depth]


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
