"""Energy and latency of whole execution paths on accelerator designs.

A path's cost is the sum over its lowered operations: MAC layers through ZigZag's
mapping search (``accel.zigzag``), vector ops through ``accel.vector``. Layers run one
after the other (no inter-layer overlap or fusion), so latency is the sum of layer cycles.

Why a cache keyed by (layer shape, design): the 12 blocks of a ViT repeat a handful of
shapes, and neighbouring paths share most of them, so a sweep of many paths needs as many
ZigZag searches as it has *unique* shapes per design. The cache is a SQLite file (one row
per (design, shape, search mode)); misses are costed in a process pool and each result is
written as it arrives, so an interrupted run keeps everything it finished.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dynavit.accel.layers import MacOp
from dynavit.accel.lower import Lowered
from dynavit.accel.vector import cost_vec_op
from dynavit.accel.zigzag import LayerCost, cost_mac_op
from dynavit.errors import DynavitError

PARTS = ("mac", "buffers", "dram", "vector")


@dataclass
class PathCost:
    """One path on one design, per image: a path lowered at batch n (``mux=n``) is divided by n.

    Latency is per image too (the pass's cycles / n): a throughput figure for multiplexed paths,
    not the time one image waits (which is the whole pass).
    """

    design: str
    config_key: str
    macs: int
    cycles: float
    latency_ms: float
    energy_pj: dict[str, float]  # by part (PARTS)
    utilization: float  # MACs / (MAC-layer cycles x peak MACs per cycle)
    mac_cycles: float
    vector_cycles: float
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def energy_uj(self) -> float:
        return sum(self.energy_pj.values()) / 1e6

    def summary(self) -> dict[str, Any]:
        return {"design": self.design, "energy_uj": self.energy_uj, "latency_ms": self.latency_ms,
                "cycles": self.cycles, "utilization": self.utilization, "macs": self.macs,
                "energy_by_part_uj": {k: v / 1e6 for k, v in self.energy_pj.items()},
                "mac_cycles": self.mac_cycles, "vector_cycles": self.vector_cycles}


class CostCache:
    """Persistent ZigZag results: (design key, layer shape, search mode) -> ``LayerCost``."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._mem: dict[str, LayerCost] = {}
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(self.path, timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS layer_costs (key TEXT PRIMARY KEY, cost TEXT NOT NULL)")
                for k, v in self._db.execute("SELECT key, cost FROM layer_costs"):
                    self._mem[k] = LayerCost.from_dict(json.loads(v))
            except sqlite3.Error as err:
                raise DynavitError(f"cannot use the accelerator cost cache {self.path}: {err}") from None

    @staticmethod
    def key(arch: Any, op: MacOp, search: str) -> str:
        return json.dumps([arch.key(), list(op.key()), search])

    def get(self, key: str) -> LayerCost | None:
        return self._mem.get(key)

    def put(self, key: str, cost: LayerCost) -> None:
        self._mem[key] = cost
        if self._db is not None:
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO layer_costs VALUES (?, ?)", (key, json.dumps(cost.to_dict())))

    def __len__(self) -> int:
        return len(self._mem)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _cost_one(args: tuple[MacOp, Any, str]) -> LayerCost:
    op, arch, search = args
    return cost_mac_op(op, arch, search=search)


def fill_cache(ops_by_arch: Iterable[tuple[Any, Iterable[MacOp]]], cache: CostCache, *, search: str = "fast",
               workers: int = 2, progress: bool = True) -> int:
    """Cost every (design, shape) pair the cache lacks; returns how many ZigZag searches ran."""
    todo: dict[str, tuple[MacOp, Any, str]] = {}
    for arch, ops in ops_by_arch:
        for op in ops:
            k = CostCache.key(arch, op, search)
            if cache.get(k) is None and k not in todo:
                todo[k] = (op, arch, search)
    if not todo:
        return 0
    if importlib.util.find_spec("zigzag") is None:
        raise DynavitError("costing layers needs ZigZag: pip install 'dynavit[accel]' (zigzag-dse)")
    bar = tqdm(total=len(todo), desc="ZigZag layer searches", unit="layer", disable=not progress)
    try:
        if workers <= 1:
            for k, job in todo.items():
                cache.put(k, _cost_one(job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_cost_one, job): k for k, job in todo.items()}
                for fut in as_completed(futures):
                    cache.put(futures[fut], fut.result())
                    bar.update()
    finally:
        bar.close()
    return len(todo)


def path_cost(low: Lowered, arch: Any, cache: CostCache, *, search: str = "fast", config_key: str = "",
              keep_layers: bool = False) -> PathCost:
    """Sum a lowered path's layer costs on ``arch`` (MAC layers must be in ``cache``)."""
    energy = dict.fromkeys(PARTS, 0.0)
    mac_cycles = vec_cycles = 0.0
    layers: list[dict[str, Any]] = []
    for op, where in zip(low.mac_ops, low.mac_modules, strict=True):
        c = cache.get(CostCache.key(arch, op, search))
        if c is None:
            c = cost_mac_op(op, arch, search=search)
            cache.put(CostCache.key(arch, op, search), c)
        energy["mac"] += c.energy_mac_pj
        energy["buffers"] += c.energy_buffers_pj
        energy["dram"] += c.energy_dram_pj
        mac_cycles += c.cycles
        if keep_layers:
            layers.append({"module": where, "kind": op.kind, "shape": op.to_dict(), **c.to_dict()})
    for op, where in zip(low.vec_ops, low.vec_modules, strict=True):
        v = cost_vec_op(op, arch)
        energy["vector"] += v.energy_vector_pj
        energy["buffers"] += v.energy_buffers_pj
        energy["dram"] += v.energy_dram_pj
        vec_cycles += v.cycles
        if keep_layers:
            layers.append({"module": where, "kind": op.cls, "op": op.op, "shape": op.to_dict(), **v.to_dict()})
    util = low.macs / (mac_cycles * arch.peak_macs_per_cycle) if mac_cycles else 0.0
    n = low.batch  # per image: a pass over n images (a multiplexed path) costs each of them 1/n
    energy = {k: v / n for k, v in energy.items()}
    mac_cycles, vec_cycles = mac_cycles / n, vec_cycles / n
    cycles = mac_cycles + vec_cycles
    return PathCost(arch.name, config_key, low.macs // n, cycles, cycles / (arch.clock_ghz * 1e6), energy, util,
                    mac_cycles, vec_cycles, layers)
