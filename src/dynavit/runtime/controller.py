"""The budget controller: for each inference, the most accurate path whose cost fits its budget.

The menu is a sweep's Pareto front (or any table of config -> quality, cost). Latency is
predicted, not known, and it varies twice over: the machine's speed drifts (other processes,
thermal limits, frequency scaling), and single runs jitter (caches, scheduling). Predictions are
corrected online from what the controller observes, as a level (the machine's speed now)
times a jitter (each run's own):

    predicted_c = p50_c * level * tail * r_c

- ``p50_c``: the config's measured batch-1 median latency from the sweep;
- ``level``: the machine's current speed, an exponentially weighted geometric mean (weight
  ``level_alpha``) of observed / p50 over the inferences of *any* path. A slowdown caused
  by other load slows every path while only the chosen one is observed, so one level serves
  all. It follows the last few runs closely because slowdowns persist: on the 2-core VM the
  log-latency of consecutive inferences correlates at 0.5-0.9, and the last runs predict the
  next better than a median of nine (the 99th-percentile one-step error shrinks from 1.22x to
  1.17x at one thread and from 1.37x to 1.28x at two; ``benchmarks/jitter_deit.py``). A single
  spike raises the level for a few runs; the errors that follow are in the window too;
- ``tail``: the (1 - target_miss) quantile of the last ``window`` one-step errors, observed /
  (p50 * level * r) with the level from *before* the run: the jitter a deadline must survive,
  measured exactly as the prediction that chose the run was made. A sweep measures p50 with
  warm caches, one config at a time; at run time paths and images alternate and the tail is
  wider;
- ``r_c``: a slow per-path residual (beta), for paths whose speed changed unlike the rest.

``profile(x)`` re-measures the menu where and when it will run (a sweep's latencies come from
another time, often another machine, thread count or load, and few runs per config) and keeps
the front by what it measured; its runs also seed the jitter window, so the tail is known
before the first frame. Until ``min_obs`` inferences were observed, ``p95_c * g`` is used (g: an
exponentially weighted mean of observed / p95).

Choosing under a latency budget, once the tail is measured, spends the miss allowance where it
buys the most quality. Each config's chance of missing, ``risk_c = P(jitter > budget /
(p50_c * level * r_c))``, is read off the jitter window, and the controller picks

    argmax_c  quality_c - price * risk_c

``price`` (quality per expected miss) is a dual variable, ``price0 * exp(price_step * deficit)``,
where ``deficit`` counts realised misses minus ``target_miss`` per frame (``observe(...,
budget_ms=...)`` feeds it). It is an integral controller: misses raise the price and make the
next choices safer until the realised rate is back at the target, while frames that could not
have missed anyway (a menu is discrete, and most budgets fall well above the chosen path) leave
allowance that later frames spend where the next path up is worth it. The exponential makes the
step relative, so the controller finds the right price whatever the menu's quality scale. It
starts at ``price0`` = 3 (a 1 % risk weighs 3 pt of top-1): starting at 1 overshot the miss
target at 2 threads on DeiT-tiny before enough misses had been seen to raise it. The
deficit is kept within ``[-miss_credit, miss_debt]``: a long easy stretch cannot bank enough
allowance to gamble with later, and a stretch of overload cannot leave the price high for
thousands of frames; misses whose risk was above even odds when chosen (nothing fitted) do not
count. A fixed per-frame quantile rule wastes the allowance (docs/benchmarks.md compares both
on DeiT-tiny). ``predict()`` still returns the (1 - target_miss) quantile, and
``rule="quantile"`` chooses by it (``predicted_c <= budget``), for users who need every single
frame to have at most ``target_miss`` chance of missing rather than the run as a whole.

Deadlines (``dynavit.deadline``): a run that falls behind its pace can drop its least important
remaining blocks when that saves its deadline. This is the one correction that acts on a run's
own jitter, which no prediction made before the run can see. ``measure_rescue(quality_of)``
measures what the drops cost each path (a ladder: quality with 1, 2, ... blocks dropped, and the
time each saves). Once it has, ``run()`` and ``budget()`` attach a ``Deadline`` under latency
budgets (``rescue``, on unless turned off), and the priced rule weighs each path by its expected
quality, rescues included, and its risk of missing even after dropping blocks. A rescued run
feeds its pace back, not its truncated time, which would read as a fast machine.

Before the tail is measured, and for an uncorrected controller, a config is chosen when
``predicted_c * (1 + margin) <= budget``. When no config has a better than even chance (or,
for other budgets, none fits), the cheapest config is returned with ``budget_met=False``: a
miss is always reported, never silent. MACs are exact and need no correction; energy is scaled
by g.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynavit.config import ExecConfig
from dynavit.deadline import Deadline, attached, default_max_drop, droppable, stage_shares, timed_stages, with_dropped
from dynavit.errors import DynavitError

BUDGETS = ("latency_ms", "energy_mj", "gmacs")
RULES = ("priced", "quantile")  # how a measured jitter tail is used: see the module docstring


@dataclass(frozen=True)
class Entry:
    """One menu item: a config with its measured quality and costs (batch 1 unless noted)."""

    config: ExecConfig
    quality: float
    latency_ms: float | None = None  # p95 at batch 1
    latency_p50_ms: float | None = None
    energy_mj: float | None = None
    gmacs: float | None = None
    batch: int = 1
    batch_ms: float | None = None  # p95 time of one batch of ``batch`` images
    label: str = ""
    shares: tuple[float, ...] | None = None  # stage shares of its time (``profile``): what a deadline reads
    ladder: tuple[tuple[float, float], ...] = ()  # (share saved, quality) with 1, 2, ... blocks dropped


@dataclass
class Choice:
    entry: Entry
    budget_met: bool  # predicted to fit (before running); ``Outcome.deadline_met`` says what happened
    predicted: float | None  # predicted cost in the budget's unit
    budget: float
    kind: str
    miss_risk: float | None = None  # predicted chance of missing a latency budget, once the tail is measured
    dropped: tuple[int, ...] = ()  # blocks the deadline dropped during the run (``budget()``: after the body)

    @property
    def config(self) -> ExecConfig:
        return self.entry.config


@dataclass
class Outcome:
    output: Any
    choice: Choice
    measured_ms: float
    deadline_met: bool | None  # None for non-latency budgets
    executed: ExecConfig | None = None  # the path that ran: the choice's, plus any blocks the deadline dropped

    @property
    def dropped(self) -> tuple[int, ...]:
        return self.choice.dropped


@dataclass
class _Correction:
    g: float = 1.0  # exponentially weighted mean of observed / expected (p95-based)
    r: dict[ExecConfig, float] = field(default_factory=dict)
    jitter: deque[float] = field(default_factory=deque)  # observed / predicted median: one-step errors
    level: float = 1.0  # exponentially weighted geometric mean of observed / p50, all paths
    observed: int = 0  # latencies fed back since the last profile
    tail: float = 1.0  # (1 - target_miss) quantile of ``jitter``, updated per observation
    sorted_jitter: np.ndarray = field(default_factory=lambda: np.empty(0))  # for miss risks
    deficit: float = 0.0  # realised misses minus target_miss per frame, in [-miss_credit, miss_debt]


class Controller:
    def __init__(self, entries: Sequence[Entry], *, model: Any = None, margin: float = 0.05, alpha: float = 0.3,
                 beta: float = 0.05, correct: bool = True, target_miss: float = 0.01, window: int = 256,
                 level_alpha: float = 0.5, min_obs: int = 8, price0: float = 3.0, price_step: float = 0.3,
                 miss_credit: float = 2.0, miss_debt: float = 10.0, rule: str = "priced", rescue: bool = True,
                 rescue_safety: float = 1.05, rescue_max_drop: int | None = None,
                 drop_order: Sequence[int] | None = None) -> None:
        if not entries:
            raise DynavitError("the controller needs at least one config in its menu")
        if not 0 < target_miss < 1 or window < 1 or not 0 < level_alpha <= 1 or margin < 0:
            raise DynavitError("need 0 < target_miss < 1, window >= 1, 0 < level_alpha <= 1 and margin >= 0")
        if price0 <= 0 or price_step < 0 or miss_credit < 0 or miss_debt < 0:
            raise DynavitError("need price0 > 0 and price_step, miss_credit, miss_debt >= 0")
        if rule not in RULES:
            raise DynavitError(f"unknown rule {rule!r} (choose from {', '.join(RULES)})")
        self.price0, self.price_step, self.rule = price0, price_step, rule
        self.rescue, self.rescue_safety, self.drop_order = rescue, rescue_safety, drop_order
        self.rescue_max_drop = rescue_max_drop
        self.miss_credit, self.miss_debt = miss_credit, miss_debt
        self.entries = list(entries)
        self.model = model
        self.margin, self.alpha, self.beta, self.correct = margin, alpha, beta, correct
        self.target_miss, self.min_obs, self.level_alpha = target_miss, min_obs, level_alpha
        self._c = _Correction(jitter=deque(maxlen=window))
        self.history: list[tuple[ExecConfig, float, float]] = []  # (config, predicted ms, observed ms or pace)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_store(cls, path: str | Path, *, model: Any = None, cost: str = "latency_p95_ms",
                   probe: torch.Tensor | None = None, runs: int = 30, progress: bool = False,
                   **kw: Any) -> Controller:
        """The Pareto front of a sweep's store (by ``cost``) as the menu.

        ``cost="accel_energy_uj:<design>"`` (after ``dynavit accel``): the menu is the front by
        modelled accelerator energy, and ``select(energy_mj=...)`` budgets that modelled energy.
        With a ``probe`` input (one image, batch 1) and a latency cost, the candidates are the fronts
        by MACs and by the stored latencies together, re-measured here with ``profile`` (``runs``
        rounds), and the menu is the front by the latencies measured now.
        """
        from dynavit.sweep.pareto import cost_of, pareto
        from dynavit.sweep.store import ResultStore

        with ResultStore(path, readonly=True) as rs:
            rows, meta = rs.rows(per_image=False), rs.meta
        if not rows:
            raise DynavitError(f"{path} has no results yet; run `dynavit sweep` first")
        if model is not None and str(getattr(model, "source", "")) != meta.get("model"):
            raise DynavitError(f"{path} was measured on {meta.get('model')}, not on {getattr(model, 'source', model)}")
        try:
            measured = any(cost_of(r, cost) is not None for r in rows)
        except ValueError as e:
            raise DynavitError(str(e)) from None
        menu = pareto(rows, cost if measured else "macs").menu()
        if probe is not None:
            if cost not in ("latency_p95_ms", "latency_p50_ms"):
                raise DynavitError(f"profiling re-measures latency; it cannot re-rank a menu by {cost}")
            seen = {r.config for r in menu}
            for extra in ("macs", "latency_p50_ms") if measured else ("macs",):
                for r in pareto(rows, extra).menu():
                    if r.config not in seen:
                        seen.add(r.config)
                        menu.append(r)
        design = cost.partition(":")[2] if cost.startswith("accel_") else None

        def energy(r: Any) -> float | None:  # modelled accelerator energy when the menu is by a design
            if design is None:
                return r.energy_mj
            e = r.accel.get(design, {}).get("energy_uj")
            return None if e is None else e / 1e3

        entries = [Entry(config=r.config, quality=r.quality, latency_ms=r.latency_p95_ms,
                         latency_p50_ms=r.latency_p50_ms, energy_mj=energy(r), gmacs=r.macs / 1e9, batch=r.batch,
                         batch_ms=r.batch_p95_ms, label=r.label) for r in menu]
        ctrl = cls(entries, model=model, **kw)
        return ctrl if probe is None else ctrl.profile(probe, runs=runs, progress=progress)

    def profile(self, x: torch.Tensor, *, runs: int = 30, warmup: int = 2, front: bool = True,
                progress: bool = False) -> Controller:
        """Time every menu entry on ``x`` (batch 1) here and now; keep the front by what was measured.

        Entries run round-robin in a shuffled order each round, so a drift in the machine's speed
        touches all of them alike. The measured p50 and p95 replace the stored ones (a stored batch
        time is scaled by the same factor), dominated entries are dropped (``front``), and the
        correction restarts from these runs: level 1, the tail from their spread. Multiplexed paths
        (``mux`` > 1) need several images per pass and keep their stored latencies.
        """
        from tqdm.auto import trange

        dm = self._need_model()
        if x.ndim != 4 or len(x) != 1:
            raise DynavitError(f"profile needs one input image of shape (1, C, H, W), got {tuple(x.shape)}")
        if runs < 3:
            raise DynavitError(f"profile needs at least 3 runs per config, got {runs}")
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        staged = getattr(dm.module, "supports_deadline", False)  # time each stage: what a deadline reads
        previous, rng = dm.exec_config, np.random.default_rng(0)
        times: list[list[float]] = [[] for _ in self.entries]
        stages: list[list[list[float]]] = [[] for _ in self.entries]
        log: list[tuple[int, float]] = []  # (entry, ms) of every run, in the order they ran
        with torch.inference_mode():
            for e in self.entries:
                if e.config.mux == 1:
                    dm.configure(e.config)
                    for _ in range(warmup):
                        dm(x)
            timed = [i for i, e in enumerate(self.entries) if e.config.mux == 1]
            for _ in trange(runs, desc="profile menu", disable=not progress, dynamic_ncols=True):
                for i in rng.permutation(timed):
                    dm.configure(self.entries[i].config)
                    sync()
                    if staged:
                        stages[i].append(timed_stages(dm.module, x, sync if x.is_cuda else None))
                        times[i].append(sum(stages[i][-1]))
                    else:
                        t0 = time.perf_counter()
                        dm(x)
                        sync()
                        times[i].append((time.perf_counter() - t0) * 1e3)
                    log.append((int(i), times[i][-1]))
        dm.configure(previous)
        p50 = [float(np.median(t)) if t else math.nan for t in times]
        entries = []
        for e, t, m, st in zip(self.entries, times, p50, stages, strict=True):
            if not t:
                entries.append(e)
                continue
            p95 = float(np.quantile(t, 0.95))
            scale = p95 / e.latency_ms if e.latency_ms else 1.0
            entries.append(dataclasses.replace(e, latency_ms=p95, latency_p50_ms=m,
                                               batch_ms=None if e.batch_ms is None else e.batch_ms * scale,
                                               shares=tuple(stage_shares(st)) if st else e.shares))
        keep = list(range(len(entries)))
        if front:
            from dynavit.sweep.pareto import front_indices

            keep = front_indices([e.latency_ms or math.inf for e in entries], [e.quality for e in entries])
        self.entries = [entries[i] for i in keep]
        old, kept = self._c, set(keep)
        c = self._c = _Correction(jitter=deque(maxlen=old.jitter.maxlen))
        c.jitter.extend(ms / p50[i] for i, ms in log if i in kept)
        if c.jitter:
            self._refresh_tail()
        return self

    # ---- prediction ------------------------------------------------------------------------------
    def _base_ms(self, e: Entry, batch: int) -> float | None:
        if e.latency_ms is None:
            return None
        if batch == 1 or e.batch_ms is None or e.batch <= 1:
            return e.latency_ms * batch  # no batch measurement: batch-1 latency times the images
        # linear between the two measured batch sizes (and beyond): fixed overhead + per-image work
        return e.latency_ms + (e.batch_ms - e.latency_ms) * (batch - 1) / (e.batch - 1)

    def _median_ms(self, e: Entry, batch: int) -> float | None:
        tail = self._base_ms(e, batch)
        if tail is None or not e.latency_p50_ms or not e.latency_ms:
            return tail
        return tail * e.latency_p50_ms / e.latency_ms

    def predict(self, e: Entry, kind: str = "latency_ms", batch: int = 1) -> float | None:
        if kind == "gmacs":
            return None if e.gmacs is None else e.gmacs * batch
        if kind == "energy_mj":
            return None if e.energy_mj is None else e.energy_mj * batch * (self._c.g if self.correct else 1.0)
        base = self._base_ms(e, batch)
        if base is None or not self.correct:
            return base
        r = self._c.r.get(e.config, 1.0)
        if self._tail_known:
            return self._median_ms(e, batch) * self._c.level * self._c.tail * r
        return base * self._c.g * r

    @property
    def _tail_known(self) -> bool:
        return len(self._c.jitter) >= self.min_obs

    def _refresh_tail(self) -> None:
        c = self._c
        c.sorted_jitter = np.sort(np.fromiter(c.jitter, float))
        c.tail = float(np.quantile(c.sorted_jitter, 1 - self.target_miss))

    def miss_risk(self, e: Entry, budget_ms: float, batch: int = 1) -> float | None:
        """The chance that ``e`` overruns ``budget_ms``: the share of the jitter window above the slack.

        With a rescue ladder (``measure_rescue``), the chance that even dropping blocks does not save
        it. None until the tail is measured (and for an uncorrected controller): no distribution yet.
        """
        outlook = self._outlook(e, budget_ms, batch)
        return None if outlook is None else outlook[0]

    def _outlook(self, e: Entry, budget_ms: float, batch: int) -> tuple[float, float] | None:
        """(miss risk, expected quality) of running ``e`` under ``budget_ms``, read off the jitter window.

        A run whose jitter J stays under the slack keeps ``e.quality``. With a ladder, a run the
        deadline can save by dropping k blocks (J * (1 - saved_k) * safety <= slack, k the fewest)
        gets the quality of that path; a run none of the ladder saves is computed in full and misses.
        """
        median = self._median_ms(e, batch)
        if median is None or not self.correct or not self._tail_known:
            return None
        c = self._c
        slack = budget_ms / (median * c.level * c.r.get(e.config, 1.0))
        if not (self.rescue and e.ladder and batch == 1):
            return float(share_above(c.sorted_jitter, slack)), e.quality
        saved = np.array([0.0] + [s for s, _ in e.ladder])
        quality = np.array([e.quality] + [q for _, q in e.ladder])
        # share of runs the deadline cannot save with k drops (k = 0: the deadline does not act)
        above = share_above(c.sorted_jitter, slack / ((1 - saved) * self.rescue_safety))
        expected = (1 - above[0] + above[-1]) * e.quality + float(np.dot(above[:-1] - above[1:], quality[1:]))
        return float(above[-1]), float(expected)

    @property
    def price(self) -> float:
        """Quality one expected miss costs in ``select``: rises with recent misses above the target."""
        return self.price0 * math.exp(self.price_step * self._c.deficit)

    @property
    def tail(self) -> float:
        """The jitter factor a deadline must survive: a high quantile of observed / expected."""
        return self._c.tail

    # ---- selection -------------------------------------------------------------------------------
    def select(self, *, latency_ms: float | None = None, energy_mj: float | None = None,
               gmacs: float | None = None, batch: int = 1) -> Choice:
        kind, budget = _one_budget(latency_ms=latency_ms, energy_mj=energy_mj, gmacs=gmacs)
        if batch < 1:
            raise DynavitError(f"batch must be at least 1, got {batch}")
        priced = [(e, self.predict(e, kind, batch)) for e in self.entries]
        priced = [(e, p) for e, p in priced if p is not None]
        if not priced:
            raise DynavitError(f"no config in the menu has a {kind} measurement (was the sweep run on a GPU "
                               "with an energy counter?)" if kind == "energy_mj" else f"no {kind} in the menu")
        measured_tail = kind == "latency_ms" and self.correct and self._tail_known
        if measured_tail and self.rule == "priced":
            return self._priced(priced, budget, batch)
        # the margin guards predictions without a measured tail; a measured tail already is the margin
        slack = 1.0 if kind == "gmacs" or measured_tail else 1.0 + self.margin
        fits = [(e, p) for e, p in priced if p * slack <= budget]
        met = bool(fits)
        e, p = max(fits, key=lambda ep: (ep[0].quality, -ep[1])) if fits else min(priced, key=lambda ep: ep[1])
        return Choice(e, met, p, budget, kind, self.miss_risk(e, budget, batch) if kind == "latency_ms" else None)

    def _priced(self, priced: list[tuple[Entry, float]], budget: float, batch: int) -> Choice:
        risky = [(e, p, self._outlook(e, budget, batch)) for e, p in priced]
        likely = [(e, p, o) for e, p, o in risky if o is not None and o[0] <= 0.5]
        if not likely:  # nothing has an even chance: the cheapest, flagged
            e, p, o = min(risky, key=lambda t: t[1])
            return Choice(e, False, p, budget, "latency_ms", None if o is None else o[0])
        price = self.price
        e, p, o = max(likely, key=lambda t: (t[2][1] - price * t[2][0], -t[1]))
        return Choice(e, True, p, budget, "latency_ms", o[0])

    def observe(self, config: ExecConfig, measured_ms: float, batch: int = 1, *,
                budget_ms: float | None = None, pace_ms: float | None = None) -> None:
        """Feed back a measured latency of ``config``; updates the slowdown estimates.

        ``budget_ms``: the latency budget it ran under, so that misses are counted against the target.
        ``pace_ms``: when a deadline dropped blocks, the whole path's time at the run's pace
        (``Deadline.full_ms``): the machine's speed is learnt from it, misses from ``measured_ms``.
        """
        e = next((x for x in self.entries if x.config == config), None)
        if e is None or not math.isfinite(measured_ms) or measured_ms <= 0:
            return
        speed_ms = measured_ms if pace_ms is None or not math.isfinite(pace_ms) or pace_ms <= 0 else pace_ms
        base = self._base_ms(e, batch)
        if base is None:
            return
        predicted = self.predict(e, "latency_ms", batch)
        self.history.append((config, predicted or math.nan, speed_ms))
        if not self.correct:
            return
        c = self._c
        risk = None if budget_ms is None else self.miss_risk(e, budget_ms, batch)
        if risk is not None and risk <= 0.5:  # a miss predicted anyway (nothing fitted) is not the price's doing
            c.deficit = min(self.miss_debt, max(-self.miss_credit,
                                                c.deficit + float(measured_ms > budget_ms) - self.target_miss))
        r = c.r.get(config, 1.0)
        c.g = (1 - self.alpha) * c.g + self.alpha * speed_ms / (base * r)
        ratio = speed_ms / self._median_ms(e, batch)
        c.jitter.append(ratio / (c.level * r))  # the error of the prediction this run was chosen by
        self._refresh_tail()
        c.r[config] = (1 - self.beta) * r + self.beta * ratio / c.level  # this path vs the rest
        a = self.level_alpha
        c.level = c.level ** (1 - a) * ratio ** a
        c.observed += 1

    @property
    def slowdown(self) -> float:
        """How much slower than in the sweep the machine runs now (the level: recent observed / p50)."""
        return self._c.level if self._c.observed else self._c.g

    # ---- running ---------------------------------------------------------------------------------
    def _need_model(self) -> Any:
        if self.model is None:
            raise DynavitError("this controller has no model: build it with Controller.from_store(..., model=dm)")
        return self.model

    def deadline(self, choice: Choice, *, cuda: bool = False, budget_ms: float | None = None,
                 batch: int = 1) -> Deadline | None:
        """The in-run deadline for a latency choice (None when rescue is off or the path cannot take one).

        It needs a model whose forward consults a deadline, a drop order (``drop_order``, else the
        model's calibration ranking) and the chosen path's rescue ladder (``measure_rescue``, after
        ``profile``): a deadline whose cost the selection cannot weigh is not attached. In paired
        runs on DeiT-tiny, deadlines without the ladder cost top-1 (docs/benchmarks.md).
        ``budget_ms``: the time the run may take, when not the choice's budget (a server's batch
        runs by the tightest of its requests' deadlines); ``batch``: images in the run.
        """
        if not self.rescue or choice.kind != "latency_ms" or not choice.entry.ladder:
            return None
        order = self._drop_order()
        if order is None:
            return None
        budget = choice.budget if budget_ms is None else budget_ms
        if not budget > 0:  # already late: no drop can save it
            return None
        median = self._median_ms(choice.entry, batch)
        expected = median * self.slowdown * self._c.r.get(choice.config, 1.0) if median else None
        return Deadline(budget, choice.entry.shares, order, safety=self.rescue_safety,
                        max_drop=self.rescue_max_drop, expected_ms=expected,
                        sync=torch.cuda.synchronize if cuda else None)

    @property
    def can_rescue(self) -> bool:
        """Whether runs can carry a deadline: a model whose forward takes one, and a block ranking."""
        return self.rescue and self._drop_order() is not None

    def _drop_order(self) -> list[int] | None:
        """Blocks least important first (``drop_order``, else the calibration's); None: no deadline possible."""
        if self.model is None or not getattr(self.model.module, "supports_deadline", False):
            return None
        if self.drop_order is not None:
            return list(self.drop_order)
        calib = getattr(self.model, "calibration", None)
        return calib.block_order("block") if calib is not None and "block" in calib.block_kl else None

    def measure_rescue(self, quality_of: Callable[..., float], *, progress: bool = False) -> Controller:
        """Measure what the deadline's drops cost each path, so that ``select`` can count on them.

        For every entry with stage shares, the quality (``quality_of(config)``, e.g.
        ``simulate.path_quality``: labelled images) with its first 1, 2, ... droppable blocks
        dropped, up to the deadline's ``max_drop``, and the share of the path's time each saves. A
        ``quality_of`` that takes ``next_config`` is told the rung measured next, so that it can
        keep the activations the two share (``path_quality`` does). With these ladders the priced
        rule weighs a tight path by its expected quality (runs the deadline saves lose a block or
        two) and its risk of missing even so.
        """
        from tqdm.auto import tqdm

        dm, order = self._need_model(), self._drop_order()
        hinted = "next_config" in inspect.signature(quality_of).parameters  # can keep shared activations
        if order is None:
            raise DynavitError("rescue needs a model whose forward takes a deadline and a block ranking "
                               "(calibrate the model, or give drop_order)")
        previous, plans = dm.exec_config, {}  # entry index -> (blocks dropped in turn, time each saves, rungs)
        for i, e in enumerate(self.entries):
            if e.shares is None or e.config.mux > 1:
                continue
            plan = dm.configure(e.config).module.plan
            limit = self.rescue_max_drop if self.rescue_max_drop is not None else default_max_drop(len(plan.blocks))
            blocks = droppable(plan, order)[:limit]
            plans[i] = (blocks, np.cumsum([e.shares[1 + j] for j in blocks]),
                        [with_dropped(e.config, blocks[:k + 1]) for k in range(len(blocks))])
        # one sequence of rungs, each told the next: rung k and k + 1 share the blocks before blocks[k + 1].
        # Activations kept at one depth serve a later rung only if the next depth is not shallower: each
        # ladder runs in the direction (shallow to deep drop, or back) whose shared depths rise more often
        flat = []
        for blocks, _, rungs in plans.values():
            depths = blocks[1:]
            rising = sum(a <= b for a, b in zip(depths, depths[1:], strict=False))
            falling = sum(a >= b for a, b in zip(depths, depths[1:], strict=False))
            flat += rungs if rising >= falling else rungs[::-1]
        quality: dict[ExecConfig, float] = {}
        for c, nxt in tqdm(list(zip(flat, [*flat[1:], None], strict=True)), desc="rescue ladder",
                           disable=not progress, dynamic_ncols=True):
            quality[c] = float(quality_of(c, next_config=nxt) if hinted else quality_of(c))
        entries = []
        for i, e in enumerate(self.entries):
            if i in plans:
                _, saved, rungs = plans[i]
                e = dataclasses.replace(e, ladder=tuple((float(saved[k]), quality[c]) for k, c in enumerate(rungs)))
            entries.append(e)
        dm.configure(previous)
        self.entries = entries
        return self

    def run(self, x: torch.Tensor, **budget: float) -> Outcome:
        """Select, configure, run and time one inference; the measurement corrects later predictions.

        Under a latency budget the run carries a deadline (``deadline()``): when it falls behind, the
        least important remaining blocks are dropped; ``Outcome.executed`` is the path that ran.
        """
        dm = self._need_model()
        choice = self.select(batch=len(x), **budget)
        dm.configure(choice.config)
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        deadline = self.deadline(choice, cuda=x.is_cuda)
        t0 = time.perf_counter()
        with attached(dm.module, deadline, t0), torch.inference_mode():
            out = dm(x)
            sync()
        ms = (time.perf_counter() - t0) * 1e3
        return Outcome(out, *self._settle(choice, deadline, ms, len(x)))

    def _settle(self, choice: Choice, deadline: Deadline | None, ms: float, batch: int,
                ) -> tuple[Choice, float, bool | None, ExecConfig]:
        """Feed a finished run back; what an ``Outcome`` needs after the output."""
        dropped = tuple(deadline.dropped) if deadline is not None else ()
        choice.dropped = dropped
        latency = choice.kind == "latency_ms"
        self.observe(choice.config, ms, batch, budget_ms=choice.budget if latency else None,
                     pace_ms=deadline.full_ms if dropped else None)
        executed = deadline.executed(choice.config) if deadline is not None else choice.config
        return choice, ms, (ms <= choice.budget if latency else None), executed

    @contextlib.contextmanager
    def budget(self, *, batch: int = 1, **budget: float) -> Iterator[Choice]:
        """``with ctrl.budget(latency_ms=4): out = dm(x)``: the body runs on the chosen path and is timed.

        The model's forwards in the body carry the run's deadline (see ``run``); ``choice.dropped``
        says, after the body, which blocks it dropped.
        """
        dm = self._need_model()
        choice = self.select(batch=batch, **budget)
        previous = dm.exec_config
        dm.configure(choice.config)
        cuda = torch.cuda.is_available()
        deadline = self.deadline(choice, cuda=cuda)
        t0 = time.perf_counter()
        try:
            with attached(dm.module, deadline, t0):
                yield choice
        finally:
            if cuda:
                torch.cuda.synchronize()
            self._settle(choice, deadline, (time.perf_counter() - t0) * 1e3, batch)
            dm.configure(previous)


def share_above(sorted_values: np.ndarray, x: float | np.ndarray) -> float | np.ndarray:
    """The share of ``sorted_values`` above ``x`` (elementwise for an array): a miss risk read off a jitter sample."""
    return 1.0 - np.searchsorted(sorted_values, x, side="right") / len(sorted_values)


def _one_budget(**budgets: float | None) -> tuple[str, float]:
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise DynavitError(f"give exactly one budget ({', '.join(BUDGETS)}), got {len(given)}")
    (kind, value), = given.items()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DynavitError(f"{kind} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise DynavitError(f"{kind} must be a positive finite number, got {value}")
    return kind, value
