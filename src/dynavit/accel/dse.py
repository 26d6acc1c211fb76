"""Cost a sweep's paths on accelerator designs, and explore designs (``dynavit accel``).

``cost_store``: every (or the chosen) config of a result store, lowered once and costed on each
design; the modelled energy and latency go back into the store (``accel`` table), where the
Pareto fronts, the report and the controller read them as costs ``accel_energy_uj:<design>``.

``explore`` (the design-space exploration): for each design with vector size V, the channel
knobs of every config are rounded up to multiples of V (``granularity = V``): a V-wide unit
cannot skip fewer channels than V. A rounded config is a different path with its own
quality, so it is *measured* (added to the store, same images and protocol) unless its plan
equals the original's. Then, per design: the energy-quality front and the energy saved at a
given quality drop. Heads are whole heads already; token counts are not channel knobs.

"The least-energy path within 1 pt" is a choice among many paths: by default it is made on one half
of the store's images and its drop is reported, with a paired interval, on the other half.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynavit.accel.arch import Arch
from dynavit.accel.cost import CostCache, PathCost, fill_cache, path_cost
from dynavit.accel.lower import Lowered, lower, lower_mean
from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.sweep import stats
from dynavit.sweep.engine import MAC_IMAGES
from dynavit.sweep.measured import load_measured
from dynavit.sweep.pareto import pareto
from dynavit.sweep.run import SweepTarget, measure_configs
from dynavit.sweep.store import ResultStore, Row, config_key


def load_store_model(store: str | Path, model: str | None = None) -> Any:
    """The store's model (or ``model``) as its sweep measured it; refused when its weights are not the store's."""
    return load_measured(store, model, device="cpu")[0]


def _plan_key(cfg: ExecConfig, dm: Any) -> Any:
    """What executes, without the config's spelling (two configs, one plan: one path)."""
    if cfg.mux != 1:  # a multiplexed model's full path: the config is the plan
        return cfg
    return cfg.variant, dataclasses.replace(dm.plan_for(cfg), config=ExecConfig())  # a variant's own plan


class Lowerer:
    """Lowers each distinct plan once (two configs with equal plans execute the same ops).

    A path whose token counts depend on the image is lowered on ``images()`` (called once, when
    the first such path comes), the images its MACs were measured on, and averaged (``lower_mean``).
    """

    def __init__(self, dm: Any, images: Callable[[], list[torch.Tensor]] | None = None, bits: int = 8) -> None:
        self.dm, self.bits, self._images_of = dm, bits, images
        self._images: list[torch.Tensor] | None = None
        self._by_plan: dict[Any, Lowered] = {}

    def __call__(self, cfg: ExecConfig) -> Lowered:
        key = _plan_key(cfg, self.dm)
        if key not in self._by_plan:  # a multiplexed path is lowered as one pass of its N images
            if cfg.token_threshold is not None and cfg.mux == 1:
                if self._images_of is None:
                    raise DynavitError(f"{cfg!r} keeps as many tokens as each image lets it: costing it needs "
                                       "the images it was measured on")
                self._images = self._images if self._images is not None else self._images_of()
                self._by_plan[key] = lower_mean(self.dm, cfg, self._images, bits=self.bits)
            else:
                self._by_plan[key] = lower(self.dm, cfg, bits=self.bits, batch=cfg.mux)
        return self._by_plan[key]


def store_images(store: str | Path, dm: Any) -> Callable[[], list[torch.Tensor]]:
    """The images the store's sweep averaged per-image MACs over, decoded for ``dm`` when first asked."""
    with ResultStore(store, readonly=True) as rs:
        target = SweepTarget(**rs.last_target())
    return lambda: target.images(dm)[0].spread(MAC_IMAGES)


def _select(rows: Sequence[Row], configs: Sequence[ExecConfig] | None, store: Path) -> list[Row]:
    if configs is None:
        return list(rows)
    by_key = {r.key: r for r in rows}
    missing = [c.to_json() for c in configs if config_key(c) not in by_key]
    if missing:
        raise DynavitError(f"{store} has no measured row for {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + "; sweep a config before costing it")
    return [by_key[config_key(c)] for c in configs]


def cost_store(store: str | Path, archs: Sequence[Arch], *, model: str | None = None,
               configs: Sequence[ExecConfig] | None = None, cache: str | Path | None = None, search: str = "fast",
               workers: int = 2, progress: bool = True, keep_layers: bool = False,
               ) -> dict[str, list[tuple[Row, PathCost]]]:
    """Cost stored configs on each design and write the results back into the store.

    ``keep_layers``: each ``PathCost`` also lists its layers (shape, cycles, energy by part).
    """
    store = Path(store)
    dm = load_store_model(store, model)
    with ResultStore(store, readonly=True) as rs:
        rows = _select(rs.rows(per_image=False), configs, store)
    lowerer = Lowerer(dm, store_images(store, dm))
    lowered = [lowerer(r.config) for r in tqdm(rows, desc="lowering paths", unit="cfg", disable=not progress)]
    cc = CostCache(cache or store.with_name(store.name + ".accel-cache"))
    try:
        unique = {op for low in lowered for op in low.mac_ops}
        fill_cache([(a, unique) for a in archs], cc, search=search, workers=workers, progress=progress)
        out: dict[str, list[tuple[Row, PathCost]]] = {}
        with ResultStore(store) as rs:
            for a in archs:
                costs = [path_cost(low, a, cc, search=search, config_key=r.key, keep_layers=keep_layers)
                         for r, low in zip(rows, lowered, strict=True)]
                for r, c in zip(rows, costs, strict=True):
                    rs.add_accel(r.config, a.name, a.key(), c.summary())
                out[a.name] = list(zip(rows, costs, strict=True))
    finally:
        cc.close()
    return out


# ------------------------------------------------------------------------------------ exploration
@dataclass
class DesignResult:
    arch: Arch
    rows: list[Row]  # the configs as this design runs them (channels rounded to its granularity)
    costs: list[PathCost]
    rounded: int = 0  # configs whose plan changed with the granularity
    task: str = "classification"
    split: tuple[np.ndarray, np.ndarray] | None = None  # (choosing, scoring) image indices; None: in-sample

    def _quality(self, i: int, images: np.ndarray | None) -> float:
        r = self.rows[i]
        return r.quality if images is None else stats.point(r.per_image[images], self.task)

    def front(self) -> list[int]:
        """Indices of the energy-quality Pareto front, cheapest first."""
        order = sorted(range(len(self.rows)), key=lambda i: (self.costs[i].energy_uj, -self.rows[i].quality))
        out, best = [], -1.0
        for i in order:
            if self.rows[i].quality > best:
                out.append(i)
                best = self.rows[i].quality
        return out

    def default(self) -> int:
        return next(i for i, r in enumerate(self.rows) if r.config.is_default)

    def best_within_drop(self, drop: float) -> int:
        """The least-energy config whose quality is at most ``drop`` (fraction) below the default's,
        on the choosing images (all of them without a split)."""
        q = [self._quality(i, self.split[0] if self.split else None) for i in range(len(self.rows))]
        q0 = q[self.default()]
        ok = [i for i in range(len(self.rows)) if q[i] >= q0 - drop - 1e-12]
        return min(ok, key=lambda i: (self.costs[i].energy_uj, -q[i]))

    def summary(self, drops: Sequence[float]) -> dict[str, Any]:
        d = self.default()
        e0, t0 = self.costs[d].energy_uj, self.costs[d].latency_ms
        out: dict[str, Any] = {"design": self.arch.name, "vector_size": self.arch.vector_size,
                               "global_buffer_kib": self.arch.global_buffer_kib,
                               "default_energy_uj": e0, "default_latency_ms": t0,
                               "default_utilization": self.costs[d].utilization,
                               "energy_by_part_uj": {k: v / 1e6 for k, v in self.costs[d].energy_pj.items()},
                               "rounded_configs": self.rounded, "at_drop": {}}
        for drop in drops:
            i = self.best_within_drop(drop)
            out["at_drop"][f"{100 * drop:g}"] = {
                "config": self.rows[i].config.to_dict(), "label": self.rows[i].label, **self._reported(i),
                "energy_uj": self.costs[i].energy_uj, "energy_saving": 1 - self.costs[i].energy_uj / e0,
                "latency_ms": self.costs[i].latency_ms, "latency_saving": 1 - self.costs[i].latency_ms / t0}
        return out

    def _reported(self, i: int) -> dict[str, Any]:
        """A chosen path's quality and drop: on the scoring images with a paired interval, or in-sample."""
        d = self.default()
        if self.split is None:
            return {"quality": self.rows[i].quality, "drop_pts": 100 * (self.rows[d].quality - self.rows[i].quality),
                    "in_sample": True}
        pick, score = self.split
        delta, lo, hi = stats.paired_delta(self.rows[i].per_image[score], self.rows[d].per_image[score], self.task)
        return {"quality": self._quality(i, score), "drop_pts": -100 * delta, "delta_ci_pts": [100 * lo, 100 * hi],
                "selected_quality": self._quality(i, pick), "selected_drop_pts": 100 * (
                    self._quality(d, pick) - self._quality(i, pick)),
                "n_select": len(pick), "n_score": len(score), "in_sample": False}


@dataclass
class Exploration:
    designs: list[DesignResult]
    task: str
    metric: str
    drops: tuple[float, ...]
    seconds: float = 0.0
    zigzag_searches: int = 0
    measured_configs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summaries(self) -> list[dict[str, Any]]:
        return [d.summary(self.drops) for d in self.designs]

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "drops": list(self.drops), "seconds": self.seconds,
                "zigzag_searches": self.zigzag_searches, "measured_configs": self.measured_configs,
                "designs": self.summaries(), **self.extra}


def design_points(base: Arch, vector_sizes: Sequence[int], global_buffers_kib: Sequence[float] = ()) -> list[Arch]:
    """Designs of equal peak MACs/cycle: V x lanes x PEs fixed, V varied (and global buffer sizes)."""
    per_pe = base.vector_size * base.lanes
    stem = base.name.removesuffix(f"-v{base.vector_size}")
    out = []
    for v in vector_sizes:
        if v < 1 or per_pe % v:
            raise DynavitError(f"vector size {v} does not divide the {per_pe} MACs per PE of {base.name}")
        a = base.with_(vector_size=v, lanes=per_pe // v, name=f"{stem}-v{v}")
        out.append(a)
        for gb in global_buffers_kib:
            out.append(a.with_(global_buffer_kib=gb, name=f"{a.name}-gb{gb:g}k"))
    return out


def _rounded(cfg: ExecConfig, v: int) -> ExecConfig:
    if cfg.mux != 1:  # multiplexed models run their full path only: nothing to round
        return cfg
    return cfg.replace(granularity=max(v, cfg.granularity or 1))


def _pick(rows: list[Row], limit: int | None, task: str) -> list[Row]:
    """The default, the MAC front, the other configs it cannot rule out (best first), then the rest.

    With a limit, the designs are compared on the paths worth running: the ones no cheaper path
    beats significantly (paired bootstrap over the store's images), not the sweep's first N.
    """
    rows = sorted(rows, key=lambda r: (not r.config.is_default, r.id or 0))
    if limit is None or len(rows) <= limit:
        return rows
    f = pareto(rows, "macs", task=task)
    plausible = sorted((f.rows[i] for i in f.plausible), key=lambda r: -r.quality)  # most accurate first
    picked = {r.key: r for r in [rows[0], *f.menu(), *plausible, *rows]}  # dict order: first occurrence wins
    return list(picked.values())[:limit]


def explore(store: str | Path, archs: Sequence[Arch], *, model: str | None = None,
            configs: Sequence[ExecConfig] | None = None, limit: int | None = None, cache: str | Path | None = None,
            search: str = "fast", workers: int = 2, drops: Sequence[float] | None = None,
            vector_granularity: bool = True, select_share: float | None = 0.5, seed: int = 0,
            progress: bool = True) -> Exploration:
    """Energy-quality fronts of a store's configs on each design (see the module docstring).

    ``select_share``: the share of the store's images that choose each design's path at a drop; the
    rest report it. None chooses and reports on all of them (when the store's images only choose,
    and another set reports, as in the CamVid benchmark).
    """
    t0 = time.perf_counter()
    store = Path(store)
    dm = load_store_model(store, model)
    with ResultStore(store, readonly=True) as rs:
        meta = rs.meta
        rows = _select(rs.rows(per_image=limit is not None), configs, store)
    task = meta.get("task", "classification")
    drops = tuple(drops) if drops is not None else ((0.01, 0.04) if task == "classification" else (0.015, 0.04))
    if not any(r.config.is_default for r in rows):
        raise DynavitError(f"{store} has no row for the default config; the DSE measures savings against it")
    rows = _pick(rows, limit, task)
    per_design, rounded, labels = _design_configs(rows, archs, dm, vector_granularity)
    phases: dict[str, float] = {}
    t = time.perf_counter()
    new = _measure_new(store, labels, progress)
    phases["measure_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with ResultStore(store, readonly=True) as rs:
        by_key = {r.key: r for r in rs.rows(per_image=select_share is not None)}
    split = _split([by_key[config_key(c)] for cfgs in per_design for c in cfgs], select_share, seed)
    lowerer = Lowerer(dm, store_images(store, dm))
    lowered = {config_key(c): lowerer(c)
               for c in tqdm(list(dict.fromkeys(c for cfgs in per_design for c in cfgs)), desc="lowering paths",
                             unit="cfg", disable=not progress)}
    phases["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cc = CostCache(cache or store.with_name(store.name + ".accel-cache"))
    try:
        searches = fill_cache([(a, {op for c in cfgs for op in lowered[config_key(c)].mac_ops})
                               for a, cfgs in zip(archs, per_design, strict=True)], cc, search=search, workers=workers,
                              progress=progress)
        phases["zigzag_s"] = time.perf_counter() - t
        t = time.perf_counter()
        results = _design_results(store, archs, per_design, rounded, lowered, by_key, cc, search)
    finally:
        cc.close()
    phases["sum_s"] = time.perf_counter() - t
    for r in results:
        r.task, r.split = task, split
    return Exploration(results, task, meta.get("metric", "quality"), drops, time.perf_counter() - t0, searches,
                       len(new), {"phases": phases, "unique_paths": len(lowered)})


def _split(rows: Sequence[Row], share: float | None, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Choosing and scoring image indices over the rows' images, or None for in-sample choices."""
    if share is None:
        return None
    if any(r.per_image is None for r in rows):
        raise DynavitError("the store's rows carry no per-image results, so a path cannot be chosen on one half of "
                           "the images and reported on the other; re-measure them, or choose in-sample "
                           "(select_share=None)")
    return stats.split_images(len(rows[0].per_image), seed, share)


def _design_configs(rows: Sequence[Row], archs: Sequence[Arch], dm: Any, vector_granularity: bool
                    ) -> tuple[list[list[ExecConfig]], list[int], dict[ExecConfig, str]]:
    """The configs each design runs (channel knobs rounded to its vector width), one per path.

    Returns the configs per design, how many of them the rounding changed, and a label for each
    config that is not a stored row's own (a rounded path).
    """
    per_design: list[list[ExecConfig]] = []
    rounded: list[int] = []
    labels: dict[ExecConfig, str] = {}
    by_plan: dict[Any, ExecConfig] = {}
    for r in rows:  # one config (one row) per path: the first, so the default stands for its own plan
        by_plan.setdefault(_plan_key(r.config, dm), r.config)
    for a in archs:
        cfgs, n = [], 0
        for r in rows:
            c = _rounded(r.config, a.vector_size) if vector_granularity else r.config
            c = by_plan.setdefault(_plan_key(c, dm), c)  # same path as a stored or earlier config: reuse it
            if c != r.config:
                n += 1
                labels.setdefault(c, f"{r.label} @g{a.vector_size}")
            cfgs.append(c)
        per_design.append(cfgs)
        rounded.append(n)
    return per_design, rounded, labels


def _measure_new(store: Path, labels: dict[ExecConfig, str], progress: bool) -> list[ExecConfig]:
    """Measure the rounded configs the store has no row for yet; returns them."""
    with ResultStore(store, readonly=True) as rs:
        have = rs.keys()
    new = [c for c in labels if config_key(c) not in have]
    if new:
        # quality only: these paths are for the accelerator, their CPU latency is not asked for
        measure_configs(store, new, [labels[c] for c in new], strategy="accel-granularity", latency=False,
                        progress=progress)
    return new


def _design_results(store: Path, archs: Sequence[Arch], per_design: list[list[ExecConfig]], rounded: list[int],
                    lowered: dict[str, Lowered], by_key: dict[str, Row], cc: CostCache, search: str
                    ) -> list[DesignResult]:
    """Sum each design's paths from the filled cache and record them in the store (``accel`` table)."""
    results = []
    with ResultStore(store) as rs:
        for a, cfgs, n in zip(archs, per_design, rounded, strict=True):
            drs, costs = [], []
            for c in cfgs:
                pc = path_cost(lowered[config_key(c)], a, cc, search=search, config_key=config_key(c))
                rs.add_accel(c, a.name, a.key(), pc.summary())
                drs.append(by_key[config_key(c)])
                costs.append(pc)
            results.append(DesignResult(a, drs, costs, n))
    return results
