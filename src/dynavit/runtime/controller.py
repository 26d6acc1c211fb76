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

``profile(x)`` re-measures the menu where and when it will run (``runtime.timing``) and keeps
the front by what it measured; its runs also seed the jitter window. Until ``min_obs``
inferences were observed, ``p95_c * g`` is used (g: an exponentially weighted mean of observed /
p95).

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
count. A fixed per-frame quantile rule wastes the allowance (docs/results.md compares both
on DeiT-tiny). ``predict()`` still returns the (1 - target_miss) quantile, and
``rule="quantile"`` chooses by it (``predicted_c <= budget``), for users who need every single
frame to have at most ``target_miss`` chance of missing rather than the run as a whole.

Deadlines (``dynavit.deadline``): a run that falls behind its pace can drop its least important
remaining blocks when that saves its deadline, the one correction that acts on a run's own
jitter. Once ``measure_rescue`` measured what the drops cost each path (``runtime.rescue``),
``run()`` and ``budget()`` attach a ``Deadline`` under latency budgets (``rescue``, on unless
turned off; ``runtime.run`` executes it), and the priced rule weighs each path by its expected
quality, rescues included, and its risk of missing even after dropping blocks.

Before the tail is measured, and for an uncorrected controller, a config is chosen when
``predicted_c * (1 + margin) <= budget``. When no config has a better than even chance (or,
for other budgets, none fits), the cheapest config is returned with ``budget_met=False``: a
miss is always reported, never silent. MACs are exact and need no correction; energy is scaled
by g.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynavit.config import ExecConfig
from dynavit.deadline import Deadline
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.runtime.choice import Choice, Options, Outcome, one_budget, share_above
from dynavit.runtime.menu import Entry, Menu
from dynavit.runtime.rescue import drop_order, measure_ladders, require_order
from dynavit.runtime.run import Ran, forward, running
from dynavit.runtime.timing import profile_menu

HISTORY = 4096  # observations kept in ``Controller.history``


@dataclass
class _Correction:
    window: int
    g: float = 1.0  # exponentially weighted mean of observed / expected (p95-based)
    r: dict[ExecConfig, float] = field(default_factory=dict)  # one per menu path
    jitter: deque[float] = field(init=False)  # observed / predicted median: one-step errors
    level: float = 1.0  # exponentially weighted geometric mean of observed / p50, all paths
    observed: int = 0  # latencies fed back since the last profile
    tail: float = 1.0  # (1 - target_miss) quantile of ``jitter``, updated per observation
    sorted_jitter: np.ndarray = field(default_factory=lambda: np.empty(0))  # for miss risks
    deficit: float = 0.0  # realised misses minus target_miss per frame, in [-miss_credit, miss_debt]

    def __post_init__(self) -> None:
        self.jitter = deque(maxlen=self.window)


class Controller:
    """Chooses a path per inference (``select``) and learns from what runs took (``observe``).

    ``menu``: a ``Menu`` (its model is used unless ``model`` is given) or entries. ``options``
    (an ``Options``), with any of its fields overridden by keyword.
    """

    def __init__(self, menu: Menu | Sequence[Entry], *, model: DynamicModel | None = None,
                 options: Options | None = None, **overrides: Any) -> None:
        if not len(menu):
            raise DynavitError("the controller needs at least one config in its menu")
        self.options = dataclasses.replace(options or Options(), **overrides)
        self.entries = list(menu)
        self.model = model if model is not None or not isinstance(menu, Menu) else menu.model
        self._c = _Correction(self.options.window)
        self.history: deque[tuple[ExecConfig, float, float]] = deque(maxlen=HISTORY)  # (config, predicted, seen)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_store(cls, path: str | Path, *, model: DynamicModel | str | None = None, cost: str = "latency_p95_ms",
                   probe: torch.Tensor | None = None, runs: int = 30, progress: bool = False,
                   **options: Any) -> Controller:
        """A controller on a store's menu: ``Menu.read``, or ``Menu.from_store`` with a ``model`` or ``probe``.

        With ``probe`` images (N, C, H, W; each run is batch 1) the candidates are the fronts by MACs and by the
        stored latencies together, re-measured here with ``profile`` (``runs`` rounds) on ``model``
        (default: the store's, loaded as the sweep measured it).
        """
        wide = probe is not None
        menu = Menu.read(path, cost=cost) if model is None and probe is None else \
            Menu.from_store(path, model, cost=cost, wide=wide)
        ctrl = cls(menu, **options)
        return ctrl if probe is None else ctrl.profile(probe, runs=runs, progress=progress)

    def profile(self, x: torch.Tensor, *, runs: int = 30, warmup: int = 2, front: bool = True,
                progress: bool = False) -> Controller:
        """Time every entry here and now (``timing.profile_menu``), round r on image r mod N of ``x`` (N, C, H, W);
        keep the front by what was measured.

        The correction restarts from these runs: level 1, the tail from their spread.
        """
        p = profile_menu(self.entries, self._need_model(), x, runs=runs, warmup=warmup, front=front,
                           progress=progress)
        self.entries = p.entries
        self._c = _Correction(self.options.window)
        self._c.jitter.extend(p.jitter)
        if self._c.jitter:
            self._refresh_tail()
        return self

    def measure_rescue(self, quality_of: Callable[..., float], *, progress: bool = False) -> Controller:
        """Measure what the deadline's drops cost each path (``rescue.measure_ladders``), so that ``select``
        can count on them: the priced rule weighs a tight path by its expected quality (runs the
        deadline saves lose a block or two) and its risk of missing even so."""
        dm, order = self._need_model(), require_order(self._drop_order())
        variants = {e.config.variant for e in self.entries} - {None}
        self.entries = measure_ladders(self.entries, dm, order, quality_of, max_drop=self.options.rescue_max_drop,
                                       progress=progress, variant_orders={v: self._drop_order(v) for v in variants})
        return self

    # ---- prediction ------------------------------------------------------------------------------
    def _base_ms(self, e: Entry, batch: int) -> float | None:
        if e.latency_p95_ms is None:
            return None
        if batch == 1 or e.batch_p95_ms is None or e.batch <= 1:
            return e.latency_p95_ms * batch  # no batch measurement: batch-1 latency times the images
        # linear between the two measured batch sizes (and beyond): fixed overhead + per-image work
        return e.latency_p95_ms + (e.batch_p95_ms - e.latency_p95_ms) * (batch - 1) / (e.batch - 1)

    def _median_ms(self, e: Entry, batch: int) -> float | None:
        tail = self._base_ms(e, batch)
        if tail is None or not e.latency_p50_ms or not e.latency_p95_ms:
            return tail
        return tail * e.latency_p50_ms / e.latency_p95_ms

    def predict(self, e: Entry, kind: str = "latency_ms", batch: int = 1) -> float | None:
        correct = self.options.correct
        if kind == "gmacs":
            return None if e.gmacs is None else e.gmacs * batch
        if kind == "energy_mj":
            return None if e.energy_mj is None else e.energy_mj * batch * (self._c.g if correct else 1.0)
        base = self._base_ms(e, batch)
        if base is None or not correct:
            return base
        r = self._c.r.get(e.config, 1.0)
        if self._tail_known:
            return self._median_ms(e, batch) * self._c.level * self._c.tail * r
        return base * self._c.g * r

    @property
    def _tail_known(self) -> bool:
        return len(self._c.jitter) >= self.options.min_obs

    def _refresh_tail(self) -> None:
        c = self._c
        c.sorted_jitter = np.sort(np.fromiter(c.jitter, float))
        c.tail = float(np.quantile(c.sorted_jitter, 1 - self.options.target_miss))

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
        if median is None or not self.options.correct or not self._tail_known:
            return None
        c = self._c
        slack = budget_ms / (median * c.level * c.r.get(e.config, 1.0))
        if not (self.options.rescue and e.ladder and batch == 1):
            return float(share_above(c.sorted_jitter, slack)), e.quality
        saved = np.array([0.0] + [s for s, _ in e.ladder])
        quality = np.array([e.quality] + [q for _, q in e.ladder])
        # share of runs the deadline cannot save with k drops (k = 0: the deadline does not act)
        above = share_above(c.sorted_jitter, slack / ((1 - saved) * self.options.rescue_safety))
        expected = (1 - above[0] + above[-1]) * e.quality + float(np.dot(above[:-1] - above[1:], quality[1:]))
        return float(above[-1]), float(expected)

    @property
    def price(self) -> float:
        """Quality one expected miss costs in ``select``: rises with recent misses above the target."""
        return self.options.price0 * math.exp(self.options.price_step * self._c.deficit)

    @property
    def tail(self) -> float:
        """The jitter factor a deadline must survive: a high quantile of observed / expected."""
        return self._c.tail

    @property
    def slowdown(self) -> float:
        """How much slower than in the sweep the machine runs now (the level: recent observed / p50)."""
        return self._c.level if self._c.observed else self._c.g

    # ---- selection -------------------------------------------------------------------------------
    def select(self, *, latency_ms: float | None = None, energy_mj: float | None = None,
               gmacs: float | None = None, batch: int = 1) -> Choice:
        kind, budget = one_budget(latency_ms=latency_ms, energy_mj=energy_mj, gmacs=gmacs)
        if batch < 1:
            raise DynavitError(f"batch must be at least 1, got {batch}")
        priced = [(e, self.predict(e, kind, batch)) for e in self.entries]
        priced = [(e, p) for e, p in priced if p is not None]
        if not priced:
            raise DynavitError(f"no config in the menu has a {kind} measurement (was the sweep run on a GPU "
                               "with an energy counter?)" if kind == "energy_mj" else f"no {kind} in the menu")
        measured_tail = kind == "latency_ms" and self.options.correct and self._tail_known
        if measured_tail and self.options.rule == "priced":
            return self._priced(priced, budget, batch)
        # the margin guards predictions without a measured tail; a measured tail already is the margin
        slack = 1.0 if kind == "gmacs" or measured_tail else 1.0 + self.options.margin
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

    # ---- feedback --------------------------------------------------------------------------------
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
        o, c = self.options, self._c
        if not o.correct:
            return
        risk = None if budget_ms is None else self.miss_risk(e, budget_ms, batch)
        if risk is not None and risk <= 0.5:  # a miss predicted anyway (nothing fitted) is not the price's doing
            c.deficit = min(o.miss_debt, max(-o.miss_credit, c.deficit + float(measured_ms > budget_ms)
                                             - o.target_miss))
        r = c.r.get(config, 1.0)
        c.g = (1 - o.alpha) * c.g + o.alpha * speed_ms / (base * r)
        ratio = speed_ms / self._median_ms(e, batch)
        c.jitter.append(ratio / (c.level * r))  # the error of the prediction this run was chosen by
        self._refresh_tail()
        c.r[config] = (1 - o.beta) * r + o.beta * ratio / c.level  # this path vs the rest
        c.level = c.level ** (1 - o.level_alpha) * ratio ** o.level_alpha
        c.observed += 1

    def settle(self, choice: Choice, ran: Ran, batch: int = 1) -> None:
        """Feed a finished run of ``choice`` back (its pace when the deadline dropped blocks)."""
        choice.dropped = ran.dropped
        latency = choice.kind == "latency_ms"
        self.observe(choice.config, ran.ms, batch, budget_ms=choice.budget if latency else None, pace_ms=ran.pace_ms)

    # ---- running ---------------------------------------------------------------------------------
    def _need_model(self) -> DynamicModel:
        if self.model is None:
            raise DynavitError("this controller has no model: build it with Controller.from_store(..., model=dm)")
        return self.model

    def deadline(self, choice: Choice, *, cuda: bool = False, budget_ms: float | None = None,
                 batch: int = 1) -> Deadline | None:
        """The in-run deadline for a latency choice (None when rescue is off or the path cannot take one).

        It needs a model whose forward consults a deadline, a drop order and the chosen path's rescue
        ladder (``measure_rescue``, after ``profile``): a deadline whose cost the selection cannot
        weigh is not attached. ``budget_ms``: the time the run may take, when not the choice's budget
        (a server's batch runs by the tightest of its requests' deadlines); ``batch``: images in the run.
        """
        if not self.options.rescue or choice.kind != "latency_ms" or not choice.entry.ladder:
            return None
        order = self._drop_order(choice.config.variant)
        budget = choice.budget if budget_ms is None else budget_ms
        if order is None or not budget > 0:  # already late: no drop can save it
            return None
        median = self._median_ms(choice.entry, batch)
        expected = median * self.slowdown * self._c.r.get(choice.config, 1.0) if median else None
        return Deadline(budget, choice.entry.shares, order, residual=choice.entry.residual,
                        safety=self.options.rescue_safety, max_drop=self.options.rescue_max_drop, expected_ms=expected,
                        sync=torch.cuda.synchronize if cuda else None)

    @property
    def can_rescue(self) -> bool:
        """Whether runs can carry a deadline: a model whose forward takes one, and a block ranking."""
        return self.options.rescue and self._drop_order() is not None

    def _drop_order(self, variant: str | None = None) -> list[int] | None:
        return drop_order(self.model, self.options.drop_order, variant)

    def run(self, x: torch.Tensor, **budget: float) -> Outcome:
        """Select, configure, run and time one inference (``runtime.run``); the time corrects later predictions.

        Under a latency budget the run carries a deadline (``deadline()``): when it falls behind, the
        least important remaining blocks are dropped; ``Outcome.executed`` is the path that ran.
        """
        dm = self._need_model()
        choice = self.select(batch=len(x), **budget)
        ran = forward(dm, choice.config, x, self.deadline(choice, cuda=x.is_cuda))
        self.settle(choice, ran, len(x))
        met = ran.ms <= choice.budget if choice.kind == "latency_ms" else None
        return Outcome(ran.output, choice, ran.ms, met, ran.executed)

    @contextlib.contextmanager
    def budget(self, *, batch: int = 1, **budget: float) -> Iterator[Choice]:
        """``with ctrl.budget(latency_ms=4): out = dm(x)``: the body runs on the chosen path and is timed.

        The model's forwards in the body carry the run's deadline (see ``run``); ``choice.dropped``
        says, after the body, which blocks it dropped. The model's previous path is restored after.
        """
        dm = self._need_model()
        choice = self.select(batch=batch, **budget)
        cuda = torch.cuda.is_available()
        ran = Ran(choice.config)
        try:
            with running(dm, choice.config, self.deadline(choice, cuda=cuda), cuda=cuda, restore=True) as ran:
                yield choice
        finally:
            self.settle(choice, ran, batch)
