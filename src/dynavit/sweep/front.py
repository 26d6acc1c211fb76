"""The Pareto front of a result store, with the reference row its reductions are measured against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynavit.errors import DynavitError
from dynavit.sweep.pareto import Front, cost_of, pareto
from dynavit.sweep.store import ResultStore, Row


@dataclass
class StoredFront:
    front: Front
    meta: dict[str, Any]  # the store's model, task and metric
    n_rows: int  # rows in the store, with or without a value for the cost
    default: Row | None  # the default path's row: the baseline of every reduction

    def reduction(self, row: Row) -> float | None:
        """Share of the default path's MACs this row saves."""
        return None if self.default is None else 1 - row.macs / self.default.macs


def front_of_store(store: str | Path, cost: str = "macs") -> StoredFront:
    """Read ``store`` and compute its front by ``cost``; a one-line error for an empty store or unknown cost."""
    with ResultStore(store, readonly=True) as rs:
        rows, meta = rs.rows(), rs.meta
    if not rows:
        raise DynavitError(f"{store} has no results yet; run `dynavit sweep` first")
    try:
        if all(cost_of(r, cost) is None for r in rows):
            raise DynavitError(f"no config in {store} has a value for {cost!r}")
    except ValueError as e:
        raise DynavitError(str(e)) from None
    f = pareto(rows, cost, task=meta.get("task", "classification"))
    return StoredFront(f, meta, len(rows), next((r for r in rows if r.config.is_default), None))


__all__ = ["StoredFront", "front_of_store"]
