"""What a controller is told and what it answers: its options, a choice, and the outcome of running it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.runtime.menu import Entry

BUDGETS = ("latency_ms", "energy_mj", "gmacs")
RULES = ("priced", "quantile")  # how a measured jitter tail is used: see ``dynavit.runtime.controller``


@dataclass(frozen=True)
class Options:
    """How the controller predicts and chooses (``dynavit.runtime.controller`` explains each term)."""

    margin: float = 0.05  # on predictions without a measured tail
    alpha: float = 0.3  # weight of a new observation in g (observed / p95)
    beta: float = 0.05  # weight of a new observation in a path's residual r
    correct: bool = True  # correct predictions online (False: trust the menu's latencies)
    target_miss: float = 0.01
    window: int = 256  # one-step errors kept for the tail
    level_alpha: float = 0.5
    min_obs: int = 100  # observations before the tail is trusted: a 99th percentile of fewer is its max
    price0: float = 3.0
    price_step: float = 0.3
    miss_credit: float = 2.0
    miss_debt: float = 10.0
    rule: str = "priced"
    rescue: bool = True  # attach deadlines once ladders are measured
    rescue_safety: float = 1.05
    rescue_max_drop: int | None = None
    drop_order: tuple[int, ...] | None = None  # blocks least important first (default: the calibration's)

    def __post_init__(self) -> None:
        if not 0 < self.target_miss < 1 or self.window < 1 or not 0 < self.level_alpha <= 1 or self.margin < 0:
            raise DynavitError("need 0 < target_miss < 1, window >= 1, 0 < level_alpha <= 1 and margin >= 0")
        if self.price0 <= 0 or self.price_step < 0 or self.miss_credit < 0 or self.miss_debt < 0:
            raise DynavitError("need price0 > 0 and price_step, miss_credit, miss_debt >= 0")
        if self.rule not in RULES:
            raise DynavitError(f"unknown rule {self.rule!r} (choose from {', '.join(RULES)})")
        if self.drop_order is not None:
            object.__setattr__(self, "drop_order", tuple(self.drop_order))


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


def share_above(sorted_values: np.ndarray, x: float | np.ndarray) -> float | np.ndarray:
    """The share of ``sorted_values`` above ``x`` (elementwise for an array): a miss risk read off a jitter sample."""
    return 1.0 - np.searchsorted(sorted_values, x, side="right") / len(sorted_values)


def one_budget(**budgets: float | None) -> tuple[str, float]:
    """(kind, value) of the one budget given, checked: a positive finite number."""
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
