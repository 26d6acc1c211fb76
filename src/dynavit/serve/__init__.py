"""HTTP serving: FastAPI app, micro-batching, Prometheus metrics (the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_for_store(model: str | None, store: str | Path, device: str = "cpu",
                   profile_runs: int = 0, **controller: Any) -> tuple[Any, Any]:
    """The model as the store's sweep measured it (same calibration, same multiplexed models) and its controller.

    ``profile_runs`` > 0 re-measures the menu on this machine first (``Controller.profile``); ``controller``:
    further ``Controller`` options (``rule``, ``target_miss``, ...).
    """
    from dynavit.errors import DynavitError
    from dynavit.models import load
    from dynavit.runtime import Controller
    from dynavit.sweep.store import ResultStore

    with ResultStore(store, readonly=True) as rs:
        target = rs.last_target()
        meta = rs.meta
    name = model or target["model"]
    dm = load(name, device=device)
    if str(dm.source) != meta.get("model"):
        raise DynavitError(f"{store} was measured on {meta.get('model')}, not on {dm.source}")
    if target.get("calibration"):
        dm.load_calibration(target["calibration"])
    for folder in target.get("multiplexers") or ():
        dm.add_multiplexer(folder)
    probe = dm.example_input() if profile_runs else None
    return dm, Controller.from_store(store, model=dm, probe=probe, runs=profile_runs, **controller)
