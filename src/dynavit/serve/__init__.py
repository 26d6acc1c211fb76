"""HTTP serving: FastAPI app, micro-batching, Prometheus metrics (the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_for_store(model: str | None, store: str | Path, device: str = "cpu", profile_runs: int = 0,
                   rescue: bool = False, progress: bool = False, **controller: Any) -> tuple[Any, Any]:
    """The model as the store's sweep measured it (same calibration, same multiplexed models) and its controller.

    ``profile_runs`` > 0 re-measures the menu on this machine first (``Controller.profile``);
    ``rescue``: then measures each path's rescue ladder on the sweep's own images
    (``Controller.measure_rescue``), so that budgeted requests run under a deadline; it needs those
    images where the sweep read them and a calibrated ViT. ``controller``: further ``Controller``
    options (``rule``, ``target_miss``, ...).
    """
    from dynavit.errors import DynavitError
    from dynavit.model import load
    from dynavit.runtime import Controller
    from dynavit.runtime.simulate import path_quality
    from dynavit.sweep.run import SweepTarget
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
    if rescue and not profile_runs:
        raise DynavitError("rescue needs the menu profiled at start-up (profile runs > 0): a deadline needs "
                           "each block's share of the path's time")
    probe = dm.example_input() if profile_runs else None
    ctrl = Controller.from_store(store, model=dm, probe=probe, runs=profile_runs, progress=progress, **controller)
    if rescue:
        if not ctrl.can_rescue:
            raise DynavitError(f"{dm.source} cannot drop blocks under a deadline: that takes a calibrated ViT")
        data, _ = SweepTarget(**target).images(dm, progress=progress)
        ctrl.measure_rescue(path_quality(dm, data), progress=progress)
    return dm, ctrl
