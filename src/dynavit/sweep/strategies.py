"""Search strategies: which configs to measure, in rounds (ask / tell).

A point is one level index per knob (see ``space.py``); point (0, ..., 0) is the default.
Strategies decide only from quality and MACs, which are deterministic, never from latency,
which is not: a resumed sweep therefore proposes exactly the configs the interrupted one
would have, and finds the finished ones in the store.

- ``grid``: every point.
- ``random``: the default plus ``budget - 1`` distinct points drawn uniformly.
- ``greedy``: the study's "skip where resilient". First every knob alone at every level (the
  per-knob resilience curves), then a descent from the default: each round tries moving
  every knob one level further and keeps the move that loses the least quality per MAC saved.
- ``evolutionary``: NSGA-II over (quality up, MACs down): non-dominated sorting, crowding
  distance, binary tournaments, uniform crossover, +-1-level mutations.
"""

from __future__ import annotations

import itertools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

from dynavit.errors import DynavitError

Point = tuple[int, ...]
Score = tuple[float, float]  # (quality, macs)

STRATEGIES = ("grid", "random", "greedy", "evolutionary")


class Strategy(ABC):
    name = ""

    def __init__(self, shape: Sequence[int], budget: int | None, seed: int = 0) -> None:
        self.shape = tuple(shape)
        self.budget = budget
        self.rng = random.Random(seed)
        self.scores: dict[Point, Score | None] = {}  # None: the point is not a valid config
        self.default: Point = (0,) * len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def left(self) -> int:
        return (self.budget if self.budget is not None else self.size) - len(self.scores)

    @abstractmethod
    def ask(self) -> list[Point]:
        """The next points to measure (none: done)."""

    def tell(self, results: dict[Point, Score | None]) -> None:
        self.scores.update(results)

    def _fresh(self, points: Sequence[Point]) -> list[Point]:
        out: list[Point] = []
        for p in points:
            if p not in self.scores and p not in out:
                out.append(p)
        return out[: max(self.left, 0)]


class Grid(Strategy):
    name = "grid"

    def ask(self) -> list[Point]:
        if self.scores:
            return []
        if self.budget is not None and self.budget < self.size:
            raise DynavitError(f"the grid has {self.size} configs, more than --budget {self.budget}; "
                               "raise the budget or use --strategy random/greedy/evolutionary")
        pts = [self.default] + [p for p in _product(self.shape) if p != self.default]
        return pts


class RandomSearch(Strategy):
    name = "random"

    def ask(self) -> list[Point]:
        if self.scores:
            return []
        n = min(self.budget or 0, self.size)
        if n >= self.size:
            return [self.default] + [p for p in _product(self.shape) if p != self.default]
        pts = {self.default}
        out = [self.default]
        while len(out) < n:
            p = tuple(self.rng.randrange(k) for k in self.shape)
            if p not in pts:
                pts.add(p)
                out.append(p)
        return out


class Greedy(Strategy):
    name = "greedy"

    def __init__(self, shape: Sequence[int], budget: int | None, seed: int = 0) -> None:
        super().__init__(shape, budget, seed)
        self.current: Point | None = None

    def singles(self) -> list[Point]:
        pts = [self.default]
        for k, n in enumerate(self.shape):
            for lv in range(1, n):
                p = list(self.default)
                p[k] = lv
                pts.append(tuple(p))
        return pts

    def ask(self) -> list[Point]:
        if self.left <= 0:
            return []
        if self.current is None:
            self.current = self.default
            return self._fresh(self.singles())
        while True:
            moves = self._moves(self.current)
            fresh = self._fresh(moves)
            if fresh or not moves:
                return fresh
            if not self._advance():
                return []

    def _moves(self, p: Point) -> list[Point]:
        return [p[:k] + (p[k] + 1,) + p[k + 1:] for k in range(len(p)) if p[k] + 1 < self.shape[k]]

    def _advance(self) -> bool:
        """Move to the measured neighbour that loses the least quality per MAC saved."""
        base = self.scores.get(self.current)
        moves = [m for m in self._moves(self.current) if self.scores.get(m) is not None]
        if base is None or not moves or any(m not in self.scores for m in self._moves(self.current)):
            return False
        q0, m0 = base

        def loss_per_mac(m: Point) -> tuple[float, float]:
            q, c = self.scores[m]  # type: ignore[misc]
            saved = m0 - c
            return ((q0 - q) / saved if saved > 0 else math.inf, -saved)

        self.current = min(moves, key=loss_per_mac)
        return True


class Evolutionary(Strategy):
    """NSGA-II (Deb et al. 2002) on two objectives: maximise quality, minimise MACs."""

    name = "evolutionary"

    def __init__(self, shape: Sequence[int], budget: int | None, seed: int = 0, population: int | None = None):
        super().__init__(shape, budget, seed)
        self.pop_size = population or max(8, min(24, (budget or 16) // 4))
        self.population: list[Point] = []

    def ask(self) -> list[Point]:
        if self.left <= 0:
            return []
        if not self.population:
            init = [self.default]
            for k, n in enumerate(self.shape):  # the most aggressive level of each knob alone
                p = list(self.default)
                p[k] = n - 1
                init.append(tuple(p))
            tries = 0
            while len(set(init)) < self.pop_size and tries < 100 * self.pop_size:
                init.append(tuple(self.rng.randrange(n) for n in self.shape))
                tries += 1
            return self._fresh(init)
        children: list[Point] = []
        tries = 0
        while len(children) < self.pop_size and tries < 50 * self.pop_size:
            tries += 1
            a, b = self._tournament(), self._tournament()
            child = tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b, strict=True))
            child = self._mutate(child)
            if child not in self.scores and child not in children:
                children.append(child)
        return self._fresh(children)

    def tell(self, results: dict[Point, Score | None]) -> None:
        super().tell(results)
        valid = [p for p in dict.fromkeys(self.population + list(results)) if self.scores.get(p) is not None]
        ranked = _nsga_order([self.scores[p] for p in valid])  # type: ignore[misc]
        self.population = [valid[i] for i in ranked[: self.pop_size]]
        self._rank = {p: r for r, p in enumerate(self.population)}

    def _tournament(self) -> Point:
        a, b = self.rng.choice(self.population), self.rng.choice(self.population)
        return a if self._rank[a] <= self._rank[b] else b

    def _mutate(self, p: Point) -> Point:
        out = list(p)
        rate = 1.0 / len(out)
        changed = False
        for k, n in enumerate(self.shape):
            if n > 1 and self.rng.random() < rate:
                out[k] = min(n - 1, max(0, out[k] + self.rng.choice((-1, 1))))
                changed = True
        if not changed:  # always move somewhere, else crossover of equal parents repeats them
            k = self.rng.choice([k for k, n in enumerate(self.shape) if n > 1])
            out[k] = self.rng.randrange(self.shape[k])
        return tuple(out)


def dominates(a: Score, b: Score) -> bool:
    """a is at least as good in both (quality up, MACs down) and strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def fronts(scores: Sequence[Score]) -> list[list[int]]:
    """Non-dominated sorting: indices of front 0, front 1, ..."""
    n = len(scores)
    dominated_by = [0] * n
    dominating: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j and dominates(scores[i], scores[j]):
                dominating[i].append(j)
            elif i != j and dominates(scores[j], scores[i]):
                dominated_by[i] += 1
    out, cur = [], [i for i in range(n) if dominated_by[i] == 0]
    while cur:
        out.append(cur)
        nxt = []
        for i in cur:
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        cur = nxt
    return out


def _crowding(scores: Sequence[Score], front: list[int]) -> dict[int, float]:
    dist = {i: 0.0 for i in front}
    for obj in (0, 1):
        order = sorted(front, key=lambda i: scores[i][obj])
        lo, hi = scores[order[0]][obj], scores[order[-1]][obj]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi > lo:
            for a, i, b in zip(order, order[1:], order[2:], strict=False):
                dist[i] += (scores[b][obj] - scores[a][obj]) / (hi - lo)
    return dist


def _nsga_order(scores: Sequence[Score]) -> list[int]:
    """All indices, best first: by front, then by crowding distance (larger first), then index."""
    order: list[int] = []
    for front in fronts(scores):
        crowd = _crowding(scores, front)
        order += sorted(front, key=lambda i: (-crowd[i], i))
    return order


def _product(shape: Sequence[int]) -> list[Point]:
    return list(itertools.product(*(range(n) for n in shape)))


def make(name: str, shape: Sequence[int], budget: int | None, seed: int = 0) -> Strategy:
    classes = {c.name: c for c in (Grid, RandomSearch, Greedy, Evolutionary)}
    if name not in classes:
        raise DynavitError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    if name != "grid" and budget is None:
        raise DynavitError(f"--strategy {name} needs --budget N (how many configs to measure)")
    if budget is not None and budget < 1:
        raise DynavitError(f"--budget must be at least 1, got {budget}")
    if math.prod(shape) < 2:
        raise DynavitError("the search space has only the default config; add knobs with levels")
    return classes[name](shape, budget, seed)
