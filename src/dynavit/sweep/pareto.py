"""Pareto fronts over quality and a cost, with the uncertainty of quality taken into account.

Two sets per cost:
- ``front``: the rows no other row beats on the point estimates (at most the cost, at least
  the quality, strictly better in one). This is the controller's menu: quality rises
  monotonically with cost along it.
- ``plausible``: the rows that no other row beats *significantly*: a row is dropped only if
  a row of at most its cost is better by a paired bootstrap 95% interval that excludes zero.
  A row outside ``front`` but inside ``plausible`` may be optimal; the images cannot tell.

The task (classification hits or segmentation pixel counts) is read off the rows' per-image
statistics, so a caller cannot pair one task's rows as the other's. ``warnings`` names latencies
that drifted while they were measured (``latency_warnings``). ``confirmed_best`` chooses "the best
config under a constraint" on one half of the images and reports it on the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    warnings: list[str] = field(default_factory=list)  # latencies that drifted while measured

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


def pareto(rows: Sequence[Row], cost: str = "macs", *, task: str | None = None, n_boot: int = 1000,
           seed: int = 0) -> Front:
    """Fronts of ``rows`` (needs per-image data for ``plausible``).

    ``task``: checked against the rows' per-image statistics, which decide it (see ``stats.task_of``).
    """
    warnings = latency_warnings(rows)
    rows = sorted((r for r in rows if cost_of(r, cost) is not None and r.quality is not None),
                  key=lambda r: (cost_of(r, cost), -r.quality))
    c = np.array([cost_of(r, cost) for r in rows], dtype=float)
    front = front_indices(c, [r.quality for r in rows])
    plausible = list(range(len(rows)))
    if rows and all(r.per_image is not None for r in rows):
        task = _task(rows, task)
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
    return Front(cost, rows, front, plausible, warnings)


def best_within(rows: Sequence[Row], cost: str, limit: float) -> Row | None:
    """The most accurate row whose cost is at most ``limit``."""
    fits = [r for r in rows if (v := cost_of(r, cost)) is not None and v <= limit and r.quality is not None]
    return max(fits, key=lambda r: (r.quality, -cost_of(r, cost))) if fits else None


def _task(rows: Sequence[Row], task: str | None) -> str:
    """The rows' own task; a ``task`` that contradicts it is an error, not a silent re-reading."""
    found = stats.task_of([r.per_image for r in rows])
    if found is None:
        return task or "classification"
    if task is not None and task != found:
        raise ValueError(f"rows hold {found} statistics, not {task}")
    return found


DRIFT_FACTOR = 1.5  # repeated timings of one config further apart than this: the machine's speed moved


def latency_warnings(rows: Sequence[Row], factor: float = DRIFT_FACTOR) -> list[str]:
    """What makes the rows' latencies untrustworthy: a config whose repeated timings disagree by more
    than ``factor`` (median of its first vs its last runs), or a default path whose time moved by more
    than ``factor`` between the start and the end of a round of measurements (``Evaluator.measure_round``)."""
    out, drifts = [], set()
    for r in rows:
        t = r.metrics.get("latency") if isinstance(r.metrics, dict) else None
        if not isinstance(t, dict):
            continue
        spread = t.get("spread")
        if spread is not None and spread > factor:
            out.append(f"{r.label or r.key}: its repeated timings disagree by {spread:.2f}x (> {factor}x)")
        d = t.get("default_drift")
        if d is not None and max(d, 1 / d) > factor:
            drifts.add(round(d, 2))
    out += [f"the default path's time moved {d:.2f}x between the start and the end of a round of timings "
            f"(> {factor}x): the machine's speed drifted while the latencies were measured" for d in sorted(drifts)]
    return out


@dataclass
class Confirmed:
    """A row chosen on one half of the images and scored on the other."""

    row: Row
    selected_quality: float  # on the half that chose it (biased upwards: it won there)
    quality: float  # on the other half
    quality_lo: float
    quality_hi: float
    n_select: int
    n_confirm: int
    delta: float | None = None  # against the reference, paired, on the confirming half
    delta_lo: float | None = None
    delta_hi: float | None = None
    confirm_idx: np.ndarray | None = None  # the confirming images (per-image indices)


def confirmed_best(rows: Sequence[Row], fits: Callable[[Row], bool], *, reference: Row | None = None,
                   task: str | None = None, seed: int = 0, n_boot: int = 1000) -> Confirmed | None:
    """The most accurate row that ``fits``, chosen on one half of the images, scored on the other.

    "The best of 128 configs", chosen and given an interval on the same images, carries the luck of
    the draw that made it win; on the other half that luck is gone.
    """
    cands = [r for r in rows if fits(r) and r.per_image is not None]
    if not cands:
        return None
    task = _task(cands, task)
    pick_idx, score_idx = stats.split_images(len(cands[0].per_image), seed)
    best = max(cands, key=lambda r: (stats.point(r.per_image[pick_idx], task), -r.macs))
    held = best.per_image[score_idx]
    lo, hi = stats.interval(held, task, n_boot, seed)
    out = Confirmed(best, stats.point(best.per_image[pick_idx], task), stats.point(held, task), lo, hi,
                    len(pick_idx), len(score_idx), confirm_idx=score_idx)
    if reference is not None and reference.per_image is not None:
        out.delta, out.delta_lo, out.delta_hi = stats.paired_delta(held, reference.per_image[score_idx], task,
                                                                   n_boot, seed)
    return out
