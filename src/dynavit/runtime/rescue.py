"""Rescue ladders: what a deadline's block drops cost each path, measured before they are relied on.

A ``Deadline`` (``dynavit.deadline``) drops a run's least important remaining blocks when the run
falls behind. Selection can count on that only if it knows what the drops cost: for every entry
with stage shares (``timing.profile``), the ladder holds the quality with its first 1, 2, ...
droppable blocks dropped, up to the deadline's ``max_drop``, and the share of the path's time
each saves (less what a dropped block that reduces tokens still takes, ``Entry.residual``). In
paired runs on DeiT-tiny, deadlines without the ladder cost top-1 (docs/results.md).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from dynavit.config import ExecConfig
from dynavit.deadline import default_max_drop, droppable, with_dropped
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.runtime.menu import Entry


def drop_order(model: DynamicModel | None, explicit: Sequence[int] | None = None,
               variant: str | None = None) -> list[int] | None:
    """Blocks least important first (``explicit``, else the calibration's); None: no deadline possible.

    A deadline needs a model whose forward consults one and a ranking of its blocks. A ``variant``'s
    paths are ranked by the variant's own calibration (``explicit`` orders the base model's blocks).
    """
    if model is None or not getattr(model.module, "supports_deadline", False):
        return None
    if variant is not None:
        variants = getattr(model, "variants", {})
        return drop_order(variants[variant], None) if variant in variants else None
    if explicit is not None:
        return list(explicit)
    calib = getattr(model, "calibration", None)
    return calib.block_order("block") if calib is not None and "block" in calib.block_kl else None


def measure_ladders(entries: Sequence[Entry], dm: DynamicModel, order: Sequence[int],
                   quality_of: Callable[..., float], *, max_drop: int | None = None,
                   progress: bool = False, variant_orders: Mapping[str, Sequence[int] | None] | None = None,
                   ) -> list[Entry]:
    """``entries`` with their ladders measured by ``quality_of(config)`` (e.g. ``simulate.path_quality``).

    A ``quality_of`` that takes ``next_config`` is told the rung measured next, so that it can keep
    the activations the two share (``path_quality`` does). Entries without stage shares and
    multiplexed paths get no ladder; a variant's paths drop blocks in ``variant_orders[name]`` (none: no ladder).
    """
    hinted = "next_config" in inspect.signature(quality_of).parameters  # can keep shared activations
    previous, plans = dm.exec_config, {}  # entry index -> (blocks dropped in turn, time each saves, rungs)
    try:
        for i, e in enumerate(entries):
            own = order if e.config.variant is None else (variant_orders or {}).get(e.config.variant)
            if e.shares is None or e.config.mux > 1 or own is None:
                continue
            plan = dm.configure(e.config).module.plan
            limit = max_drop if max_drop is not None else default_max_drop(len(plan.blocks))
            blocks = droppable(plan, own)[:limit]
            kept = e.residual or (0.0,) * len(e.shares)  # what a dropped block still takes: its token reduction
            plans[i] = (blocks, np.cumsum([e.shares[1 + j] - kept[1 + j] for j in blocks]),
                        [with_dropped(e.config, blocks[:k + 1], plan) for k in range(len(blocks))])
        rungs = _sharing_sequence([rungs for _, _, rungs in plans.values()], [b for b, _, _ in plans.values()])
        quality: dict[ExecConfig, float] = {}
        for c, nxt in tqdm(list(zip(rungs, [*rungs[1:], None], strict=True)), desc="rescue ladder",
                           disable=not progress, dynamic_ncols=True):
            quality[c] = float(quality_of(c, next_config=nxt) if hinted else quality_of(c))
    finally:
        dm.configure(previous)
    out = list(entries)
    for i, (_, saved, ladder) in plans.items():
        out[i] = dataclasses.replace(out[i], ladder=tuple((float(saved[k]), quality[c]) for k, c in enumerate(ladder)))
    return out


def _sharing_sequence(ladders: list[list[ExecConfig]], blocks: list[list[int]]) -> list[ExecConfig]:
    """Every rung in one sequence, each told the next: rung k and k + 1 share the blocks before blocks[k + 1].

    Activations kept at one depth serve a later rung only if the next depth is not shallower: each
    ladder runs in the direction (shallow to deep drop, or back) whose shared depths rise more often.
    """
    flat: list[ExecConfig] = []
    for rungs, dropped in zip(ladders, blocks, strict=True):
        depths = dropped[1:]
        rising = sum(a <= b for a, b in zip(depths, depths[1:], strict=False))
        falling = sum(a >= b for a, b in zip(depths, depths[1:], strict=False))
        flat += rungs if rising >= falling else rungs[::-1]
    return flat


def require_order(order: list[int] | None) -> list[int]:
    """``order``, or the error that says why no deadline can act."""
    if order is None:
        raise DynavitError("rescue needs a model whose forward takes a deadline and a block ranking "
                           "(calibrate the model, or give drop_order)")
    return order
