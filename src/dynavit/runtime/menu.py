"""The menu: a sweep's paths with their measured quality and costs, and the model they were measured on.

``Menu.from_store`` is how run time starts from a sweep: it loads the model exactly as the sweep
measured it (``dynavit.sweep.measured``: source, calibration, multiplexed models, variants),
refuses it when its weights fingerprint is not the one the store recorded, and reads the Pareto
front by one cost as ``Entry`` items. Entries use the store's field names (``latency_p50_ms``,
``latency_p95_ms``, ``batch_p95_ms``), and so do the controller and the server's answers.

``images`` restricts the menu to some of the sweep's images (positions in its image order, as the
store keeps per-image results): the front is chosen, and each entry's quality and interval measured,
on those images only, so that the other images can score what was chosen (``runtime.startup``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.sweep import stats
from dynavit.sweep.engine import CachedData
from dynavit.sweep.measured import load_measured, read_store
from dynavit.sweep.pareto import cost_of, pareto
from dynavit.sweep.run import SweepTarget
from dynavit.sweep.store import ResultStore, Row

LATENCY_COSTS = ("latency_p95_ms", "latency_p50_ms")


@dataclass(frozen=True)
class Entry:
    """One menu item: a config with its measured quality and costs (batch 1 unless noted)."""

    config: ExecConfig
    quality: float
    latency_p95_ms: float | None = None
    latency_p50_ms: float | None = None
    energy_mj: float | None = None
    gmacs: float | None = None
    batch: int = 1
    batch_p95_ms: float | None = None  # time of one batch of ``batch`` images
    label: str = ""
    quality_lo: float | None = None  # the quality's confidence interval, where the sweep measured one
    quality_hi: float | None = None
    shares: tuple[float, ...] | None = None  # stage shares of its time (``timing.profile``): what a deadline reads
    residual: tuple[float, ...] | None = None  # per stage, the share a dropped block still takes (its token reduction)
    ladder: tuple[tuple[float, float], ...] = ()  # (share saved, quality) with 1, 2, ... blocks dropped

    @classmethod
    def from_row(cls, r: Row, design: str | None = None) -> Entry:
        """A stored row as an entry; with ``design``, its energy is the one modelled on that accelerator."""
        energy = r.energy_mj
        if design is not None:
            e = r.accel.get(design, {}).get("energy_uj")
            energy = None if e is None else e / 1e3
        return cls(config=r.config, quality=r.quality, latency_p95_ms=r.latency_p95_ms,
                   latency_p50_ms=r.latency_p50_ms, energy_mj=energy, gmacs=r.macs / 1e9, batch=r.batch,
                   batch_p95_ms=r.batch_p95_ms, label=r.label, quality_lo=r.quality_lo, quality_hi=r.quality_hi)


@dataclass
class Menu:
    """Entries, and the model and sweep target they were measured with (None when read without a model)."""

    entries: list[Entry]
    model: DynamicModel | None = None
    store: Path | None = None
    target: dict[str, Any] = field(default_factory=dict)  # the sweep's ``SweepTarget`` fields

    def __post_init__(self) -> None:
        if not self.entries:
            raise DynavitError("a menu needs at least one config")
        self.entries = list(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def read(cls, path: str | Path, *, cost: str = "latency_p95_ms", wide: bool = False,
             precisions: Sequence[str] = (), images: Sequence[int] | None = None) -> Menu:
        """The store's Pareto front by ``cost``, without a model (to select, not to run).

        ``cost="accel_energy_uj:<design>"`` (after ``dynavit accel``): the front by modelled accelerator
        energy, which becomes the entries' ``energy_mj``. Without any measured ``cost`` the front is by
        MACs. ``wide``: the candidates a re-measurement chooses from, the fronts by MACs and by both
        stored latencies together (``Controller.profile`` then keeps the front by what it measured).
        ``precisions``: only the rows measured at these precisions (empty: all). ``images``: choose and
        score on these of the sweep's images only (positions in its image order; None: all of them).
        """
        _, target = read_store(path)
        with ResultStore(path, readonly=True) as rs:
            rows = [r for r in rs.rows(per_image=images is not None)
                    if not precisions or r.config.precision in precisions]
        if not rows:
            raise DynavitError(f"{path} has no rows at precision {', '.join(precisions)}")
        kept: dict[str, np.ndarray] = {}
        if images is not None:
            rows, kept = _on_images(rows, images, path)
        try:
            measured = any(cost_of(r, cost) is not None for r in rows)
        except ValueError as e:
            raise DynavitError(str(e)) from None
        front = pareto(rows, cost if measured else "macs").menu()
        if wide:
            if cost not in LATENCY_COSTS:
                raise DynavitError(f"profiling re-measures latency; it cannot re-rank a menu by {cost}")
            front = _union(front, *(pareto(rows, c).menu() for c in ("macs", "latency_p50_ms") if measured
                                    or c == "macs"))
        if images is not None:  # an interval for what was chosen only: a bootstrap per row is not free
            front = [_with_interval(r, kept[r.key]) for r in front]
        design = cost.partition(":")[2] if cost.startswith("accel_") else None
        return cls([Entry.from_row(r, design) for r in front], store=Path(path), target=target)

    @classmethod
    def from_store(cls, path: str | Path, model: str | DynamicModel | None = None, *, device: str | None = None,
                   cost: str = "latency_p95_ms", wide: bool = False, precisions: Sequence[str] = (),
                   images: Sequence[int] | None = None) -> Menu:
        """The store's front (``read``) with the model as the sweep measured it (``model``: another name
        or a loaded model; ``device``: default where the sweep ran); refused when the model's weights
        fingerprint is not the store's."""
        dm, _ = load_measured(path, model, device=device)
        menu = cls.read(path, cost=cost, wide=wide, precisions=precisions, images=images)
        menu.model = dm
        return menu

    def sweep_target(self) -> SweepTarget:
        if not self.target:
            raise DynavitError("this menu was not read from a sweep store: it has no sweep target")
        return SweepTarget(**self.target)

    def images(self, *, progress: bool = False) -> CachedData:
        """The sweep's own images (calibration images left out), decoded for the menu's model."""
        if self.model is None:
            raise DynavitError("this menu has no model: read it with Menu.from_store")
        return self.sweep_target().images(self.model, progress=progress)[0]


def _on_images(rows: Sequence[Row], images: Sequence[int], path: str | Path,
               ) -> tuple[list[Row], dict[str, np.ndarray]]:
    """The rows with their quality measured on ``images`` only, and their per-image results there (by key).

    The rows keep no per-image results (``pareto`` would bootstrap every row) and no interval yet
    (``_with_interval`` gives the chosen ones theirs)."""
    missing = next((r for r in rows if r.per_image is None), None)
    if missing is not None:
        raise DynavitError(f"{path} keeps no per-image results for {missing.label or missing.key}: its quality "
                           "cannot be measured on some of the images")
    n = {len(r.per_image) for r in rows}
    if len(n) > 1:
        raise DynavitError(f"{path}'s rows were scored on different numbers of images ({sorted(n)})")
    idx, total = np.unique(np.asarray(images, dtype=np.int64)), n.pop()
    if not len(idx) or idx[0] < 0 or idx[-1] >= total:
        raise DynavitError(f"image positions must be in [0, {total}) and at least one, got {len(idx)} "
                           f"in [{idx.min(initial=0)}, {idx.max(initial=0)}]")
    task = stats.task_of([r.per_image for r in rows])
    kept = {r.key: r.per_image[idx] for r in rows}
    return [replace(r, per_image=None, quality=stats.point(kept[r.key], task), quality_lo=None, quality_hi=None)
            for r in rows], kept


def _with_interval(r: Row, per_image: np.ndarray) -> Row:
    lo, hi = stats.interval(per_image, stats.task_of([per_image]))
    return replace(r, quality_lo=lo, quality_hi=hi)


def _union(*fronts: Sequence[Row]) -> list[Row]:
    """Rows of several fronts, each config once, in order of first appearance."""
    seen, out = set(), []
    for front in fronts:
        for r in front:
            if r.config not in seen:
                seen.add(r.config)
                out.append(r)
    return out
