"""Budget traces for ``simulate``: per-frame latency budgets, made up or read from a file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dynavit.errors import DynavitError
from dynavit.runtime.controller import Controller

TRACES = ("step", "sine", "random-walk", "bursty")


def default_bounds(controller: Controller) -> tuple[float, float]:
    """A 4x budget range starting just above the cheapest path's measured p95."""
    lo = 1.2 * min(e.latency_p95_ms for e in controller.entries if e.latency_p95_ms)
    return lo, 4 * lo


def make_trace(kind: str, n: int, lo: float, hi: float, seed: int = 0) -> np.ndarray:
    """Per-frame latency budgets (ms) between ``lo`` and ``hi``."""
    if n < 1:
        raise DynavitError(f"a trace needs at least one frame, got {n}")
    if not 0 < lo <= hi:
        raise DynavitError(f"trace bounds must satisfy 0 < lo <= hi, got {lo}, {hi}")
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    if kind == "step":  # four plateaus: hi, lo, hi, lo
        return np.where((t * 4 // n) % 2 == 0, hi, lo).astype(float)
    if kind == "sine":
        return lo + (hi - lo) * (1 + np.sin(2 * math.pi * t / max(n / 2, 1))) / 2
    if kind == "random-walk":  # in log space, reflected at the bounds
        x = np.empty(n)
        x[0] = math.log(math.sqrt(lo * hi))
        for i in range(1, n):
            x[i] = x[i - 1] + rng.normal(0, 0.08)
            x[i] = min(max(x[i], math.log(lo)), math.log(hi))
        return np.exp(x)
    if kind == "bursty":  # mostly generous, with bursts of tight budgets
        out = np.full(n, hi)
        i = 0
        while i < n:
            if rng.random() < 0.06:
                k = int(rng.integers(5, 16))
                out[i:i + k] = lo
                i += k
            i += 1
        return out
    raise DynavitError(f"unknown trace {kind!r} (choose from {', '.join(TRACES)}, or give a file)")


def load_trace(path: str | Path) -> np.ndarray:
    """One budget in ms per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DynavitError(f"cannot read trace {path}: {e}") from None
    values = []
    for i, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        try:
            v = float(line.split(",")[0])
        except ValueError:
            raise DynavitError(f"{path}:{i}: {line!r} is not a latency budget in ms") from None
        if not math.isfinite(v) or v <= 0:
            raise DynavitError(f"{path}:{i}: budget {v} must be a positive number of ms")
        values.append(v)
    if not values:
        raise DynavitError(f"{path} holds no budgets")
    return np.asarray(values)
