"""Pareto fronts over quality and a cost, with the uncertainty of quality taken into account.

Two sets per cost:
- ``front``: the rows no other row beats on the point estimates (at most the cost, at least
  the quality, strictly better in one). This is the controller's menu: quality rises
  monotonically with cost along it.
- ``plausible``: the rows that no other row beats *significantly*: a row is dropped only if
  a row of at most its cost is better by a paired bootstrap 95% interval that excludes zero.
  A row outside ``front`` but inside ``plausible`` may be optimal; the images cannot tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynavit.sweep import stats
from dynavit.sweep.store import Row

COSTS = {
    "macs": "MACs per image",
    "latency_p50_ms": "latency (ms, batch 1, p50)",
    "latency_p95_ms": "latency (ms, batch 1, p95)",
    "batch_ms_per_image": "time per image at the throughput batch (ms)",
    "energy_mj": "energy (mJ per image, batch 1)",
}
# modelled accelerator costs, per design: ``accel_energy_uj:<design>`` (see ``dynavit accel``)
ACCEL_COSTS = {
    "accel_energy_uj": "modelled accelerator energy (uJ per image)",
    "accel_latency_ms": "modelled accelerator latency (ms per image)",
}


def cost_label(cost: str) -> str:
    kind, _, design = cost.partition(":")
    return f"{ACCEL_COSTS[kind]} on {design}" if kind in ACCEL_COSTS else COSTS.get(cost, cost)


def cost_of(row: Row, cost: str) -> float | None:
    if cost == "batch_ms_per_image":
        return row.batch_p50_ms / row.batch if row.batch_p50_ms is not None and row.batch else None
    kind, _, design = cost.partition(":")
    if kind in ACCEL_COSTS and design:
        c = row.accel.get(design)
        return None if c is None else c.get(kind.removeprefix("accel_"))
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r} (choose from {', '.join(COSTS)}, "
                         "or accel_energy_uj:DESIGN / accel_latency_ms:DESIGN after `dynavit accel`)")
    return getattr(row, cost)


@dataclass
class Front:
    cost: str
    rows: list[Row]  # rows with a value for this cost, cheapest first
    front: list[int]  # indices into rows, cheapest first
    plausible: list[int]

    def menu(self) -> list[Row]:
        return [self.rows[i] for i in self.front]


def front_indices(cost: Sequence[float], quality: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, cheapest first: a point is on the front iff it is more
    accurate than everything cheaper (ties in cost: the more accurate one first)."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -quality[i]))
    front, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return front


def pareto(rows: Sequence[Row], cost: str = "macs", *, task: str = "classification", n_boot: int = 1000,
           seed: int = 0) -> Front:
    """Fronts of ``rows`` (needs per-image data for ``plausible``)."""
    rows = sorted((r for r in rows if cost_of(r, cost) is not None and r.quality is not None),
                  key=lambda r: (cost_of(r, cost), -r.quality))
    c = np.array([cost_of(r, cost) for r in rows], dtype=float)
    front = front_indices(c, [r.quality for r in rows])
    plausible = list(range(len(rows)))
    if rows and all(r.per_image is not None for r in rows):
        reps = stats.replicates_many([r.per_image for r in rows], task, n_boot, seed)  # (R, B), paired
        plausible = []
        for i in range(len(rows)):
            cheaper = np.flatnonzero(c <= c[i])
            cheaper = cheaper[cheaper != i]
            if len(cheaper):
                lo = np.nanpercentile(reps[cheaper] - reps[i], 2.5, axis=1)
                if np.any(lo > 0):
                    continue
            plausible.append(i)
    return Front(cost, rows, front, plausible)


def best_within(rows: Sequence[Row], cost: str, limit: float) -> Row | None:
    """The most accurate row whose cost is at most ``limit``."""
    fits = [r for r in rows if (v := cost_of(r, cost)) is not None and v <= limit and r.quality is not None]
    return max(fits, key=lambda r: (r.quality, -cost_of(r, cost))) if fits else None
