"""Run a chosen path, timed, under its deadline if it has one: the one runner of the run-time side.

``Controller.run``, ``Controller.budget``, the trace simulation and the server's micro-batcher all
execute a choice through ``running``: the model is configured for the path, the deadline (if
any) is attached to the family model and counted from the start of the timed body, the clock
stops after the body (after a CUDA sync on a GPU), and ``Ran`` records what happened, including
the blocks the deadline dropped and the run's pace. A rescued run feeds its pace back, not its
truncated time, which would read as a fast machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dynavit.config import ExecConfig
from dynavit.deadline import Deadline, attached
from dynavit.model import DynamicModel


@dataclass
class Ran:
    """One timed run: its output (set by the body), time, and what its deadline did."""

    config: ExecConfig
    output: Any = None
    ms: float = 0.0
    dropped: tuple[int, ...] = ()  # blocks the deadline dropped
    pace_ms: float | None = None  # with drops: the whole path's time at the run's pace (``Deadline.full_ms``)
    ran_config: ExecConfig | None = None  # with drops: the path that ran (``Deadline.executed``)

    @property
    def executed(self) -> ExecConfig:
        """The path that ran: the chosen config with the dropped blocks skipped as well."""
        return self.ran_config or self.config


DeadlineAt = Callable[[float], Deadline | None]  # the run's deadline, given its start (a perf_counter value)


@contextlib.contextmanager
def running(dm: DynamicModel, config: ExecConfig, deadline: Deadline | DeadlineAt | None = None, *,
            cuda: bool = False, restore: bool = False) -> Iterator[Ran]:
    """``with running(dm, cfg, deadline) as ran: ran.output = dm(x)``: the body runs ``config``, timed.

    ``deadline``: attached for the body, counted from its start; a callable is given that start
    (a budget that counts from when the run begins). ``restore``: put back the model's previous
    path afterwards. ``ran`` is filled in even when the body raises.
    """
    previous = dm.exec_config
    dm.configure(config)
    ran = Ran(config)
    t0 = time.perf_counter()
    d = deadline(t0) if callable(deadline) else deadline
    try:
        with attached(dm.module, d, t0):
            yield ran
    finally:
        if cuda:
            torch.cuda.synchronize()
        ran.ms = (time.perf_counter() - t0) * 1e3
        if d is not None and d.dropped:
            ran.dropped, ran.pace_ms, ran.ran_config = tuple(sorted(d.dropped)), d.full_ms, d.executed(config)
        if restore:
            dm.configure(previous)


def forward(dm: DynamicModel, config: ExecConfig, x: torch.Tensor,
            deadline: Deadline | DeadlineAt | None = None) -> Ran:
    """One inference of ``x`` on ``config`` through ``running``, without autograd."""
    with torch.inference_mode(), running(dm, config, deadline, cuda=x.is_cuda) as ran:
        ran.output = dm(x)
    return ran
