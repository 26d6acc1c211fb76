"""The budget controller: for each inference, the most accurate path whose cost fits its budget.

The menu is a sweep's Pareto front (or any table of config -> quality, cost). Latency is
predicted, not known, and the machine's speed drifts (other processes, thermal limits,
frequency scaling), so predictions are corrected online:

    predicted_c = p95_c * g * r_c

- ``p95_c``: the config's measured batch-1 latency p95 from the sweep (the tail, not the median,
  because a deadline is missed by the tail);
- ``g``: a machine-wide slowdown, an exponentially weighted mean of observed / expected over
  every observation (alpha). It carries a slowdown seen on one path to all the others, so the
  controller moves to cheaper paths as soon as the machine slows, and back when it recovers;
- ``r_c``: a slower per-config residual (beta), for paths whose speed changed unlike the rest.

A config is chosen when ``predicted_c * (1 + margin) <= budget``. When nothing fits, the
cheapest config is returned with ``budget_met=False``: a miss is always reported, never silent.
MACs are exact and need no correction; energy is corrected like latency when the store has it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError

BUDGETS = ("latency_ms", "energy_mj", "gmacs")


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


@dataclass
class Choice:
    entry: Entry
    budget_met: bool  # predicted to fit (before running); ``Outcome.deadline_met`` says what happened
    predicted: float | None  # predicted cost in the budget's unit
    budget: float
    kind: str

    @property
    def config(self) -> ExecConfig:
        return self.entry.config


@dataclass
class Outcome:
    output: Any
    choice: Choice
    measured_ms: float
    deadline_met: bool | None  # None for non-latency budgets


@dataclass
class _Correction:
    g: float = 1.0
    r: dict[ExecConfig, float] = field(default_factory=dict)


class Controller:
    def __init__(self, entries: Sequence[Entry], *, model: Any = None, margin: float = 0.05, alpha: float = 0.3,
                 beta: float = 0.05, correct: bool = True) -> None:
        if not entries:
            raise DynavitError("the controller needs at least one config in its menu")
        self.entries = list(entries)
        self.model = model
        self.margin, self.alpha, self.beta, self.correct = margin, alpha, beta, correct
        self._c = _Correction()
        self.history: list[tuple[ExecConfig, float, float]] = []  # (config, predicted ms, observed ms)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_store(cls, path: str | Path, *, model: Any = None, cost: str = "latency_p95_ms",
                   **kw: Any) -> Controller:
        """The Pareto front of a sweep's store (by ``cost``) as the menu."""
        from dynavit.sweep.pareto import pareto
        from dynavit.sweep.store import ResultStore

        with ResultStore(path, readonly=True) as rs:
            rows, meta = rs.rows(per_image=False), rs.meta
        if not rows:
            raise DynavitError(f"{path} has no results yet; run `dynavit sweep` first")
        if model is not None and str(getattr(model, "source", "")) != meta.get("model"):
            raise DynavitError(f"{path} was measured on {meta.get('model')}, not on {getattr(model, 'source', model)}")
        for r in rows:
            r.per_image = None
        menu = pareto(rows, cost if any(getattr(r, cost, None) is not None for r in rows) else "macs").menu()
        entries = [Entry(config=r.config, quality=r.quality, latency_ms=r.latency_p95_ms,
                         latency_p50_ms=r.latency_p50_ms, energy_mj=r.energy_mj, gmacs=r.macs / 1e9, batch=r.batch,
                         batch_ms=r.batch_p95_ms, label=r.label) for r in menu]
        return cls(entries, model=model, **kw)

    # ---- prediction ------------------------------------------------------------------------------
    def _base_ms(self, e: Entry, batch: int) -> float | None:
        if e.latency_ms is None:
            return None
        if batch == 1 or e.batch_ms is None or e.batch <= 1:
            return e.latency_ms * batch  # no batch measurement: batch-1 latency times the images
        # linear between the two measured batch sizes (and beyond): fixed overhead + per-image work
        return e.latency_ms + (e.batch_ms - e.latency_ms) * (batch - 1) / (e.batch - 1)

    def predict(self, e: Entry, kind: str = "latency_ms", batch: int = 1) -> float | None:
        if kind == "gmacs":
            return None if e.gmacs is None else e.gmacs * batch
        base = self._base_ms(e, batch) if kind == "latency_ms" else (
            None if e.energy_mj is None else e.energy_mj * batch)
        if base is None:
            return None
        return base * self._c.g * self._c.r.get(e.config, 1.0) if self.correct else base

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
        slack = 1.0 + self.margin if kind != "gmacs" else 1.0
        fits = [(e, p) for e, p in priced if p * slack <= budget]
        if fits:
            e, p = max(fits, key=lambda ep: (ep[0].quality, -ep[1]))
            return Choice(e, True, p, budget, kind)
        e, p = min(priced, key=lambda ep: ep[1])
        return Choice(e, False, p, budget, kind)

    def observe(self, config: ExecConfig, measured_ms: float, batch: int = 1) -> None:
        """Feed back a measured latency of ``config``; updates the slowdown estimates."""
        e = next((x for x in self.entries if x.config == config), None)
        if e is None or not math.isfinite(measured_ms) or measured_ms <= 0:
            return
        base = self._base_ms(e, batch)
        if base is None:
            return
        predicted = self.predict(e, "latency_ms", batch)
        self.history.append((config, predicted or math.nan, measured_ms))
        if not self.correct:
            return
        c = self._c
        r = c.r.get(config, 1.0)
        c.g = (1 - self.alpha) * c.g + self.alpha * measured_ms / (base * r)
        c.r[config] = (1 - self.beta) * r + self.beta * measured_ms / (base * c.g)

    @property
    def slowdown(self) -> float:
        return self._c.g

    # ---- running ---------------------------------------------------------------------------------
    def _need_model(self) -> Any:
        if self.model is None:
            raise DynavitError("this controller has no model: build it with Controller.from_store(..., model=dm)")
        return self.model

    def run(self, x: torch.Tensor, **budget: float) -> Outcome:
        """Select, configure, run and time one inference; the measurement corrects later predictions."""
        dm = self._need_model()
        choice = self.select(batch=len(x), **budget)
        dm.configure(choice.config)
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = dm(x)
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        self.observe(choice.config, ms, len(x))
        met = ms <= choice.budget if choice.kind == "latency_ms" else None
        return Outcome(out, choice, ms, met)

    @contextlib.contextmanager
    def budget(self, *, batch: int = 1, **budget: float) -> Iterator[Choice]:
        """``with ctrl.budget(latency_ms=4): out = dm(x)``: the body runs on the chosen path and is timed."""
        dm = self._need_model()
        choice = self.select(batch=batch, **budget)
        previous = dm.exec_config
        dm.configure(choice.config)
        t0 = time.perf_counter()
        try:
            yield choice
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.observe(choice.config, (time.perf_counter() - t0) * 1e3, batch)
            dm.configure(previous)


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
