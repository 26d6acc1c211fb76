"""Run time as deployed, in one call: the menu loaded as measured, re-timed here, its rescues measured.

``serve``, ``simulate`` and the demo start the same way: the store's model exactly as its sweep
measured it (``Menu.from_store``), the candidate paths timed on this machine now (latency belongs
to the deployment, not to the sweep), and, for a calibrated ViT, what dropping blocks under a
deadline costs each path, measured on the sweep's own images. ``start`` is that sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.runtime.controller import Controller
from dynavit.runtime.menu import Menu
from dynavit.runtime.simulate import path_quality
from dynavit.sweep.engine import CachedData


@dataclass
class Started:
    """What ``start`` built: the controller (its ``model`` is the menu's), and the sweep's images when loaded."""

    menu: Menu
    controller: Controller
    data: CachedData | None = None
    quality_of: Callable[..., float] | None = None  # a path's quality on ``data``, as the sweep measures it

    @property
    def model(self) -> DynamicModel:
        return self.menu.model


def start(store: str | Path, model: str | DynamicModel | None = None, *, device: str | None = None,
          profile_runs: int = 30, rescue: bool | Literal["auto"] = "auto", images: bool = False,
          progress: bool = False, precisions: Sequence[str] = (), **options: Any) -> Started:
    """The store's menu and a controller on it, ready to run.

    ``profile_runs`` > 0 widens the candidates to the fronts by MACs and by stored latency and keeps
    the front by what is measured here (on the first of the sweep's images when they are loaded);
    ``rescue``: measure the rescue ladders (True: required, "auto": when the model can drop blocks);
    ``images``: load the sweep's images even when no ladder needs them. ``options``: ``Controller``
    options (``rule``, ``target_miss``, ``margin``, ...). ``precisions``: only paths measured at these.
    """
    if rescue is True and not profile_runs:
        raise DynavitError("rescue needs the menu profiled at start-up (profile runs > 0): a deadline needs "
                           "each block's share of the path's time")
    menu = Menu.from_store(store, model, device=device, wide=profile_runs > 0, precisions=precisions)
    ctrl = Controller(menu, rescue=rescue is not False, **options)
    if rescue is True and not ctrl.can_rescue:
        raise DynavitError(f"{menu.model.source} cannot drop blocks under a deadline: that takes a calibrated ViT")
    ladders = bool(rescue) and profile_runs > 0 and ctrl.can_rescue
    data = menu.images(progress=progress) if images or ladders else None
    if profile_runs:
        probe = data.frames()[0][0] if data is not None else menu.model.example_input()
        ctrl.profile(probe, runs=profile_runs, progress=progress)
    quality_of = path_quality(menu.model, data) if data is not None else None
    if ladders:
        ctrl.measure_rescue(quality_of, progress=progress)
    return Started(menu, ctrl, data, quality_of)
