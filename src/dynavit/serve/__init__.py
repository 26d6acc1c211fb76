"""HTTP serving: FastAPI app, micro-batching, Prometheus metrics (the ``serve`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynavit.model import DynamicModel
from dynavit.runtime import Controller
from dynavit.runtime.startup import start


def load_for_store(model: str | None, store: str | Path, device: str = "cpu", profile_runs: int = 0,
                   rescue: bool = False, progress: bool = False, precisions: Sequence[str] = (),
                   **controller: Any) -> tuple[DynamicModel, Controller]:
    """The model as the store's sweep measured it and its controller (``runtime.startup.start``).

    ``profile_runs`` > 0 re-measures the menu on this machine first; ``rescue``: then measures each
    path's rescue ladder on the sweep's own images, so that budgeted requests run under a deadline
    (it needs those images where the sweep read them and a calibrated ViT). ``controller``: further
    ``Controller`` options (``rule``, ``target_miss``, ...). ``precisions``: serve only paths measured at these.
    """
    s = start(store, model, device=device, profile_runs=profile_runs, rescue=rescue, progress=progress,
              precisions=precisions, **controller)
    return s.model, s.controller
