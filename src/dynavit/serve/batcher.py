"""Micro-batching: requests that chose the same path share one forward pass on the model thread.

A batcher collects them for up to ``max_wait_ms`` (or until ``max_batch``), and waits only while
more requests are being decoded: a lone request runs at once. On a multiplexed path
(``ExecConfig(mux=N)``) the batch's images are grouped N per pass in queue order, each client
reading its own slot; a group without N requests is filled with blank images (see
``dynavit.multiplex``). The model runs on one worker thread, through the runner
(``dynavit.runtime.run``) that also runs ``Controller.run``: a batch of latency-budgeted
requests carries the deadline of the tightest of them, unless a request named its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from dynavit.config import ExecConfig
from dynavit.deadline import Deadline
from dynavit.runtime.choice import Choice
from dynavit.runtime.controller import Controller
from dynavit.runtime.run import Ran, running
from dynavit.serve.images import RequestError

HISTORY = 4096  # batch sizes kept for inspection


@dataclass
class Job:
    pixels: torch.Tensor
    size: tuple[int, int]  # original (w, h), for segmentation masks
    future: asyncio.Future
    arrived: float
    predicted_ms: float = 0.0  # the controller's prediction for this image alone, for the backlog
    choice: Choice | None = None  # a latency budget's choice: the batch may run under its deadline
    due: float | None = None  # perf_counter by which the answer is due (the request's latency budget)


@dataclass
class Batcher:
    """Per-config queues drained by one task; one forward per batch on the model thread."""

    dm: Any
    max_batch: int = 8
    max_wait_ms: float = 5.0
    controller: Controller | None = None  # gives batches of latency-budgeted requests a deadline
    queues: dict[ExecConfig, list[Job]] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "dynavit-model"))

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy_until = 0.0  # perf_counter when the running batch is predicted to finish
        self.arriving = 0  # requests received but not yet queued (decoding): batch mates worth waiting for
        self.batch_sizes: deque[int] = deque(maxlen=HISTORY)

    def expected_wait_ms(self) -> float:
        """Predicted time before a request submitted now starts: the running batch plus the queue.

        Queued images are counted one by one (as if unbatched), which overestimates a batched
        backlog: the controller errs towards a cheaper path, not towards a miss.
        """
        running_ms = max(0.0, self._busy_until - time.perf_counter()) * 1e3
        return running_ms + sum(j.predicted_ms for q in self.queues.values() for j in q)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def submit(self, cfg: ExecConfig, job: Job) -> Any:
        if self._closing:
            raise RequestError(503, "the server is shutting down")
        self.queues.setdefault(cfg, []).append(job)
        self._wake.set()
        return await job.future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while any(self.queues.values()):
                cfg = min((c for c, q in self.queues.items() if q), key=lambda c: self.queues[c][0].arrived)
                wait = self.queues[cfg][0].arrived + self.max_wait_ms / 1e3 - time.perf_counter()
                # wait for batch mates only while some are on their way: a lone request runs at once
                if len(self.queues[cfg]) < self.max_batch and wait > 0 and self.arriving and not self._closing:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake.clear()
                    continue
                jobs, self.queues[cfg] = self.queues[cfg][: self.max_batch], self.queues[cfg][self.max_batch:]
                await self._run(cfg, jobs)
            if self._closing:
                return

    async def _run(self, cfg: ExecConfig, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        self.batch_sizes.append(len(jobs))
        self._busy_until = time.perf_counter() + sum(j.predicted_ms for j in jobs) / 1e3
        try:
            ran = await loop.run_in_executor(self.executor, self.forward, cfg, [j.pixels for j in jobs], jobs)
        except Exception as e:  # noqa: BLE001 - delivered to each waiting request as a 500
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        for k, j in enumerate(jobs):
            if not j.future.done():
                j.future.set_result((ran.output[k], ran, len(jobs)))

    def forward(self, cfg: ExecConfig, pixels: list[torch.Tensor], jobs: list[Job] | None = None) -> Ran:
        """One forward of ``pixels`` on ``cfg``; with ``jobs`` (their requests), under the batch's deadline."""
        same = len({p.shape for p in pixels}) == 1  # else (segmentation keeps aspect): one pass each
        deadline = self._deadline(jobs) if same and jobs else None
        with torch.inference_mode(), running(self.dm, cfg, deadline, cuda=pixels[0].is_cuda) as ran:
            ran.output = self.dm(torch.stack(pixels)) if same else [self.dm(p[None])[0] for p in pixels]
        return ran

    def _deadline(self, jobs: list[Job]) -> Callable[[float], Deadline | None] | None:
        """The batch's deadline, given when it starts: the tightest request's; none if any named its config."""
        ctrl = self.controller
        if ctrl is None or any(j.choice is None or j.due is None for j in jobs):
            return None
        tightest = min(jobs, key=lambda j: j.due)
        return lambda start: ctrl.deadline(tightest.choice, cuda=jobs[0].pixels.is_cuda,
                                           budget_ms=(tightest.due - start) * 1e3, batch=len(jobs))

    async def close(self) -> None:
        """Finish everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)
