"""HTTP serving: FastAPI app, micro-batching, Prometheus metrics (the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.runtime import Controller, Menu
from dynavit.runtime.simulate import path_quality


def load_for_store(model: str | None, store: str | Path, device: str = "cpu", profile_runs: int = 0,
                   rescue: bool = False, progress: bool = False, **controller: Any) -> tuple[DynamicModel, Controller]:
    """The model as the store's sweep measured it (``Menu.from_store``) and its controller.

    ``profile_runs`` > 0 re-measures the menu on this machine first (``Controller.profile``);
    ``rescue``: then measures each path's rescue ladder on the sweep's own images
    (``Controller.measure_rescue``), so that budgeted requests run under a deadline; it needs those
    images where the sweep read them and a calibrated ViT. ``controller``: further ``Controller``
    options (``rule``, ``target_miss``, ...).
    """
    if rescue and not profile_runs:
        raise DynavitError("rescue needs the menu profiled at start-up (profile runs > 0): a deadline needs "
                           "each block's share of the path's time")
    menu = Menu.from_store(store, model, device=device, wide=profile_runs > 0)
    dm = menu.model
    ctrl = Controller(menu, **controller)
    if profile_runs:
        ctrl.profile(dm.example_input(), runs=profile_runs, progress=progress)
    if rescue:
        if not ctrl.can_rescue:
            raise DynavitError(f"{dm.source} cannot drop blocks under a deadline: that takes a calibrated ViT")
        ctrl.measure_rescue(path_quality(dm, menu.images(progress=progress)), progress=progress)
    return dm, ctrl
