"""Prefix reuse: paths that execute the same first k blocks compute those blocks once.

Two plans that agree on everything deciding the activations after block k (``prefix_key``: the
resolution, the first k block plans, the token settings once a token op has run) produce the same
tensors there. When the next path to run is known, ``PrefixRunner`` keeps the activations at the
depth the two share, and the next path runs only the blocks after it. The result is bit-identical
to a full forward: the same ops run on the same tensors. Families that run in block steps
(``FamilyModel.steps``: ViT, Swin, SegFormer) take part; a sweep measures its configs this way, and
calibration ranks its greedy block orders this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def share_depth(impl: Any, plan: Any, other: Any) -> int:
    """How many leading blocks ``plan`` and ``other`` execute identically on ``impl`` (0: none)."""
    d = 0
    while d < len(impl.blocks) and impl.prefix_key(plan, d + 1) == impl.prefix_key(other, d + 1):
        d += 1
    return d


@dataclass
class _Saved:
    impl: Any
    depth: int
    key: tuple
    carries: list[Any]


class PrefixRunner:
    """Runs a family model in block steps, resuming from the activations the previous path left for it."""

    def __init__(self) -> None:
        self._saved: _Saved | None = None
        self.reused_blocks = 0  # block-batches not recomputed
        self.resumed = False  # whether the last path resumed from saved activations

    def outputs(self, impl: Any, batches: Sequence[torch.Tensor], save: int,
                prepare: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Iterator[torch.Tensor]:
        """``impl``'s output per batch (``impl.plan`` is the path); keeps the activations after ``save`` blocks.

        ``save``: the depth the next path shares with this one (``share_depth``; 0 keeps nothing).
        Consume every batch: what is kept is decided once the last one has run.
        """
        s = self._saved
        start, carries = 0, None
        if s is not None and s.impl is impl and impl.prefix_key(impl.plan, s.depth) == s.key:
            start, carries = s.depth, s.carries
        keep_old = save == start and carries is not None
        new: list[Any] = []
        for b, px in enumerate(batches):
            carry = carries[b] if start else impl.begin(prepare(px))
            for i in range(start, len(impl.blocks)):
                if i == save and save > start:
                    new.append(carry)
                carry = impl.step(carry, i)
            if save == len(impl.blocks) and save > start:
                new.append(carry)
            yield impl.end(carry)
        self.reused_blocks += start * len(batches)
        self.resumed = start > 0
        if not keep_old:
            self._saved = _Saved(impl, save, impl.prefix_key(impl.plan, save), new) if save > start else None
