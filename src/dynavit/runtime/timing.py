"""Time a menu where it will run: a sweep's latencies come from another time, often another machine.

``profile`` runs every entry round-robin, in a shuffled order each round, so a drift in the
machine's speed touches all of them alike; each round runs the next of the given images (batch 1),
so a path whose token counts depend on the image is timed over a mix of images, not on one. The
measured p50 and p95 replace the stored ones (a stored batch time is scaled by the same factor);
for models that run in stages, each stage is timed too, and its share of the path's time is what
a deadline reads; so is what a block that reduces tokens still takes when a deadline drops it
(``Entry.residual``). The runs' one-step errors (time / the entry's median) seed the controller's
jitter window, so the tail is known before the first frame. A p95 of fewer than 50 runs is little
more than their maximum, so callers that report it should time at least that many (the default).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import trange

from dynavit.deadline import stage_shares, timed_stages, with_dropped
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.runtime.menu import Entry
from dynavit.sweep.pareto import front_indices

PROFILE_IMAGES = 8  # real images a start-up profile cycles through, one per round


@dataclass
class Profiled:
    entries: list[Entry]  # re-measured (and, with ``front``, only those on the measured front)
    jitter: list[float]  # time / the entry's measured median, of every run of a kept entry, in run order


def profile_menu(entries: Sequence[Entry], dm: DynamicModel, x: torch.Tensor, *, runs: int = 50, warmup: int = 2,
            front: bool = True, progress: bool = False) -> Profiled:
    """Time every entry ``runs`` rounds, round r on image r mod N of ``x`` (N, C, H, W) at batch 1; keep
    the front by what was measured (``front``).

    Multiplexed paths (``mux`` > 1) need several images per pass and keep their stored latencies.
    """
    if x.ndim != 4 or len(x) < 1:
        raise DynavitError(f"profile needs input images of shape (N, C, H, W), got {tuple(x.shape)}")
    if runs < 3:
        raise DynavitError(f"profile needs at least 3 runs per config, got {runs}")
    previous = dm.exec_config
    try:
        times, stages, log = _time_entries(entries, dm, x, runs, warmup, progress)
        residual = [_residual(e, dm, x, st, max(3, runs // 5)) for e, st in zip(entries, stages, strict=True)]
    finally:
        dm.configure(previous)
    p50 = [float(np.median(t)) if t else math.nan for t in times]
    measured = []
    for e, t, m, st, res in zip(entries, times, p50, stages, residual, strict=True):
        if not t:
            measured.append(e)
            continue
        p95 = float(np.quantile(t, 0.95))
        scale = p95 / e.latency_p95_ms if e.latency_p95_ms else 1.0
        measured.append(dataclasses.replace(
            e, latency_p95_ms=p95, latency_p50_ms=m, shares=tuple(stage_shares(st)) if st else e.shares,
            residual=res if st else e.residual,
            batch_p95_ms=None if e.batch_p95_ms is None else e.batch_p95_ms * scale))
    keep = list(range(len(measured)))
    if front:
        keep = front_indices([e.latency_p95_ms or math.inf for e in measured], [e.quality for e in measured])
    kept = set(keep)
    return Profiled([measured[i] for i in keep], [ms / p50[i] for i, ms in log if i in kept])


def _time_entries(entries: Sequence[Entry], dm: DynamicModel, x: torch.Tensor, runs: int, warmup: int,
                  progress: bool) -> tuple[list[list[float]], list[list[list[float]]], list[tuple[int, float]]]:
    """(ms per entry, stage ms per entry, (entry, ms) of every run in order): the timed rounds."""
    sync = torch.cuda.synchronize if x.is_cuda else None
    staged = getattr(dm.module, "supports_deadline", False)  # time each stage: what a deadline reads
    rng = np.random.default_rng(0)
    times: list[list[float]] = [[] for _ in entries]
    stages: list[list[list[float]]] = [[] for _ in entries]
    log: list[tuple[int, float]] = []
    timed = [i for i, e in enumerate(entries) if e.config.mux == 1]
    with torch.inference_mode():
        for i in timed:
            dm.configure(entries[i].config)
            for _ in range(warmup):
                dm(x[:1])
        for r in trange(runs, desc="profile menu", disable=not progress, dynamic_ncols=True):
            xr = _image(x, r)
            for i in rng.permutation(timed):
                dm.configure(entries[i].config)
                if sync is not None:
                    sync()
                if staged:
                    stages[i].append(timed_stages(dm.module, xr, sync))
                    times[i].append(sum(stages[i][-1]))
                else:
                    t0 = time.perf_counter()
                    dm(xr)
                    if sync is not None:
                        sync()
                    times[i].append((time.perf_counter() - t0) * 1e3)
                log.append((int(i), times[i][-1]))
    return times, stages, log


def _image(x: torch.Tensor, r: int) -> torch.Tensor:
    """Round ``r``'s image of ``x``, batch 1."""
    j = r % len(x)
    return x[j:j + 1]


def _residual(e: Entry, dm: DynamicModel, x: torch.Tensor, stage_ms: list[list[float]],
              rounds: int) -> tuple[float, ...] | None:
    """Per stage, the share of ``e``'s time a block that reduces tokens still takes when dropped; None: none does.

    Timed on the path with every such block dropped at once (each keeps its token count, so the
    other stages run as in the path), over the same images in turn, over the median time of the
    path's own timed runs.
    """
    if not stage_ms:
        return None
    plan = dm.configure(e.config).module.plan
    thin = [j for j, b in enumerate(plan.blocks) if b.token_op and (b.attn or b.mlp)]
    if not thin:
        return None
    sync = torch.cuda.synchronize if x.is_cuda else None
    with torch.inference_mode():
        dm.configure(with_dropped(e.config, thin, plan))
        dm(x[:1])  # the first run after a switch of path is cold
        med = np.median([timed_stages(dm.module, _image(x, r), sync) for r in range(rounds)], axis=0)
    total = float(np.median([sum(s) for s in stage_ms]))
    own = np.median(np.asarray(stage_ms), axis=0)  # a dropped block cannot take more than running it
    out = [0.0] * len(med)
    for j in thin:
        out[1 + j] = float(min(med[1 + j], own[1 + j])) / total
    return tuple(out)
