"""Trace-driven evaluation: real inferences, frame by frame, against per-frame latency budgets.

By default each policy makes its own pass over the trace, as it would run deployed: the same
frames, the same budgets, nothing else running between its frames. On a shared machine whose
speed drifts over minutes, passes made at different times compare poorly; ``interleave=True``
runs the policies side by side instead, taking turns on each frame in a seeded random order,
so that every policy meets the same machine. Every run is timed, and a frame is a *miss* when
the measured latency exceeds that frame's budget. Policies:

- ``controller``: the budget controller with online correction, each run under a deadline that
  drops the least important remaining blocks when the run falls behind (``Controller.run``);
- ``uncorrected``: the same menu and rule, predictions never corrected, no deadline;
- ``default``: always the full model;
- ``smallest``: always the cheapest config of the menu;
- ``static``: the config the uncorrected controller picks for the median budget, for every frame;
- ``oracle``: runs every menu config on the frame and takes the most accurate one whose
  measured latency fit (the cheapest when none did): what a controller that knew each
  frame's true latency would have picked.

Further controllers (``others``, by name: another rule, no deadline, ...) run as policies of
their own, through ``Controller.run`` like ``controller``.

``load_at`` starts a competing CPU load (a second process multiplying matrices on
``load_threads`` cores, busy ``load_duty`` of the time) that far into the trace, to show the
correction at work.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynavit.config import ExecConfig
from dynavit.data.metrics import percentile_ci
from dynavit.deadline import dropped_blocks
from dynavit.errors import DynavitError
from dynavit.pipeline import Scorer
from dynavit.runtime.choice import share_above
from dynavit.runtime.controller import Controller
from dynavit.runtime.menu import Entry
from dynavit.runtime.run import forward
from dynavit.sweep.engine import Evaluator
from dynavit.sweep.stats import clopper_pearson, main_metric, point, replicates

POLICIES = ("controller", "uncorrected", "default", "smallest", "static", "oracle")


@dataclass
class PolicyStats:
    name: str
    task: str = "classification"
    latency_ms: list[float] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)  # per frame, as a sweep's per-image statistics
    met: list[bool] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)  # the executed path's quality on the menu's images
    held_out: list[float] = field(default_factory=list)  # ... on the frame images (none chose the menu)
    dropped: list[tuple[int, ...]] = field(default_factory=list)  # blocks a deadline dropped, per frame
    executed: list[ExecConfig] = field(default_factory=list)  # the path that ran, per frame
    menu_ms: list[list[float]] = field(default_factory=list)  # oracle only: every menu path's time, per frame

    def summary(self, sl: slice = slice(None)) -> dict[str, Any]:
        """Counts with exact (Clopper-Pearson) 95 % intervals: a handful of misses in a few hundred
        frames is a wide interval, and a rate of 0 is not a guarantee.

        ``quality`` (``metric``: top-1, or mIoU over the trace's pooled pixels): realised on the
        frames, the headline, with an exact interval (top-1) or a bootstrap over frames (mIoU);
        ``menu_quality``: the chosen paths' quality on the menu's images (in-sample: those images
        chose the menu); ``held_out_quality``: the same paths' quality on the frame images, free of
        which image each frame drew.
        """
        met, lat = self.met[sl], self.latency_ms[sl]
        n = len(met)
        if not n:
            return {"frames": 0, "misses": 0, "miss_rate": math.nan, "rescued": 0, "metric": main_metric(self.task),
                    "quality": math.nan, "menu_quality": math.nan, "held_out_quality": math.nan,
                    "latency_p50_ms": math.nan}
        misses = n - int(sum(met))
        return {"frames": n, "misses": misses, "miss_rate": misses / n, "miss_ci": clopper_pearson(misses, n),
                "rescued": sum(bool(d) for d in self.dropped[sl]), "metric": main_metric(self.task),
                **self._realised(np.stack(self.scores[sl])),
                "menu_quality": float(np.mean(self.quality[sl])),
                "held_out_quality": float(np.mean(self.held_out[sl])) if self.held_out else math.nan,
                "latency_p50_ms": float(np.median(lat))}

    def _realised(self, per_frame: np.ndarray) -> dict[str, Any]:
        if self.task == "classification":
            hits = int(per_frame[:, 0].sum())
            return {"quality": hits / len(per_frame), "quality_ci": clopper_pearson(hits, len(per_frame))}
        return {"quality": point(per_frame, self.task),
                "quality_ci": percentile_ci(replicates(per_frame, self.task, 1000, 0))}


def frame_scorer(data: Any) -> Callable[[torch.Tensor, Any], np.ndarray]:
    """Scores one frame's output as a sweep scores an image (``data``: the sweep's ``CachedData``)."""

    def score(logits: torch.Tensor, target: Any) -> np.ndarray:
        sc = Scorer(data.task, logits.shape[1], data.num_classes, data.ignore_index)
        sc.update(logits, [target] if data.task == "segmentation" else torch.tensor([int(target)]))
        return sc.per_image()[0]

    score.task = data.task  # type: ignore[attr-defined]
    return score


def _top1(logits: torch.Tensor, target: Any) -> np.ndarray:
    pred = logits.argmax(-1)[0]
    return np.array([int(pred) == int(target), 0], dtype=np.uint8)


@dataclass
class SimResult:
    budgets: np.ndarray
    policies: dict[str, PolicyStats]
    load_frame: int | None
    slowdown: list[float]  # the corrected controller's machine slowdown estimate per frame

    @property
    def task(self) -> str:
        return next(iter(self.policies.values())).task

    def table(self) -> list[dict[str, Any]]:
        out = []
        for name, p in self.policies.items():
            row = {"policy": name, **p.summary()}
            if self.load_frame is not None:
                before, after = p.summary(slice(0, self.load_frame)), p.summary(slice(self.load_frame, None))
                row.update(misses_before_load=before["misses"], misses_under_load=after["misses"],
                           quality_under_load=after["quality"])
            out.append(row)
        return out


class CompetingLoad:
    """A second process that keeps ``threads`` cores busy ``duty`` of the time until stopped.

    Busy and idle alternate every few milliseconds, like a co-located service, so the model
    slows down by a sustained factor instead of stopping.
    """

    CODE = ("import sys, time, torch\n"
            "threads, duty = int(sys.argv[1]), float(sys.argv[2])\n"
            "torch.set_num_threads(threads)\n"
            "a = torch.randn(256, 256)\n"
            "while True:\n"
            "    t = time.perf_counter()\n"
            "    while time.perf_counter() - t < 0.01 * duty:\n"
            "        a = (a @ a).tanh()\n"
            "    time.sleep(0.01 * (1 - duty))\n")

    def __init__(self, threads: int = 1, duty: float = 0.5) -> None:
        if not 0 < duty <= 1:
            raise DynavitError(f"load duty must be in (0, 1], got {duty}")
        self.threads, self.duty = threads, duty

    def __enter__(self) -> CompetingLoad:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.threads), str(self.duty)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


class _Policies:
    """The policies of one simulation: what each runs on a frame, and what it saw."""

    def __init__(self, dm: Any, controller: Controller, budgets: np.ndarray, policies: Sequence[str],
                 others: Mapping[str, Controller], score: Callable[[torch.Tensor, Any], np.ndarray]) -> None:
        self.dm, self.controller, self.others, self.entries = dm, controller, others, controller.entries
        self.score = score
        # the uncorrected twin: same menu and rule, predictions frozen, no deadline
        self.plain = Controller(self.entries, model=dm, options=controller.options, correct=False, rescue=False)
        self.fixed = {"static": self.plain.select(latency_ms=float(np.median(budgets))).entry,
                      "smallest": min(self.entries, key=lambda e: e.latency_p95_ms or math.inf),
                      "default": next((e for e in self.entries if e.config.is_default),
                                      max(self.entries, key=lambda e: e.quality))}
        self.names = [*policies, *others]
        task = getattr(score, "task", "classification")
        self.stats = {p: PolicyStats(p, task) for p in self.names}
        self.slowdown: list[float] = []

    def timed(self, cfg: ExecConfig, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        ran = forward(self.dm, cfg, x)
        return ran.ms, ran.output

    def choose(self, name: str, budget: float, x: torch.Tensor) -> tuple[Entry, float, torch.Tensor, ExecConfig]:
        """(entry chosen, ms, output, path that ran) of policy ``name`` on one frame."""
        if name == "oracle":
            runs = [(e, *self.timed(e.config, x)) for e in self.entries]
            self.stats["oracle"].menu_ms.append([r[1] for r in runs])
            fit = [r for r in runs if r[1] <= budget]
            e, ms, pred = max(fit, key=lambda r: r[0].quality) if fit else min(runs, key=lambda r: r[1])
            return e, ms, pred, e.config
        if name in self.others or name in ("controller", "uncorrected"):
            ctrl = self.others.get(name, self.controller if name == "controller" else self.plain)
            out = ctrl.run(x, latency_ms=budget)
            return out.choice.entry, out.measured_ms, out.output, out.executed
        e = self.fixed[name]
        return (e, *self.timed(e.config, x), e.config)

    def warm(self, x: torch.Tensor, warmup: int) -> None:  # first-call allocations are not the steady state
        for e in self.entries:
            for _ in range(warmup):
                self.timed(e.config, x)

    def step(self, name: str, frame: tuple[torch.Tensor, int], budget: float) -> None:
        x, label = frame
        e, ms, output, path = self.choose(name, budget, x)
        st = self.stats[name]
        st.latency_ms.append(ms)
        st.met.append(ms <= budget)
        st.scores.append(self.score(output, label))
        st.configs.append(e.label)
        st.executed.append(path)
        st.dropped.append(dropped_blocks(e.config, path))
        st.quality.append(e.quality)  # a rescued frame's is measured after the passes
        st.held_out.append(math.nan)  # measured after the passes, off the clock
        if name == "controller":
            self.slowdown.append(self.controller.slowdown)

    def measure_quality(self, quality_of: Callable[[ExecConfig], float] | None,
                        held_out_of: Callable[[ExecConfig], float] | None) -> None:
        """Off the clock: measuring a path's quality takes seconds."""
        for st in self.stats.values():
            for i, d in enumerate(st.dropped):
                if d:
                    st.quality[i] = quality_of(st.executed[i]) if quality_of is not None else math.nan
                if held_out_of is not None:
                    st.held_out[i] = held_out_of(st.executed[i])


def simulate(dm: Any, controller: Controller, frames: Sequence[tuple[torch.Tensor, int]], budgets: np.ndarray, *,
             load_at: float | None = None, load_threads: int = 1, load_duty: float = 0.5,
             policies: Sequence[str] = POLICIES, others: Mapping[str, Controller] | None = None,
             quality_of: Callable[[ExecConfig], float] | None = None,
             held_out_of: Callable[[ExecConfig], float] | None = None, interleave: bool = False, seed: int = 0,
             warmup: int = 3, progress: bool = True,
             score: Callable[[torch.Tensor, Any], np.ndarray] | None = None) -> SimResult:
    """Run every policy on every frame; ``frames`` are (pixels (1, 3, H, W), target) pairs, cycled.

    ``score(output, target)``: one frame's statistics (``frame_scorer``, for segmentation too);
    default: top-1 against an integer label.
    ``others``: more controllers, each a policy under its name (after ``policies``).
    ``quality_of(config)``: the quality of a path that is not on the menu, for frames on which a
    deadline dropped blocks (``path_quality`` measures it on the sweep's images). Without it such
    frames have no menu quality, and ``menu_quality`` is NaN. ``held_out_of(config)``: a path's quality on
    the frame images (``startup.start``'s ``held_out_of``), for ``held_out_quality``.
    ``interleave``: the policies take turns on each frame (order shuffled per frame with ``seed``)
    instead of making one pass each: a paired comparison on a machine whose speed drifts.
    """
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise DynavitError(f"unknown policies {sorted(unknown)} (choose from {', '.join(POLICIES)})")
    others = dict(others or {})
    clash = set(others) & set(policies)
    if clash:
        raise DynavitError(f"controllers in others cannot reuse policy names: {sorted(clash)}")
    if not frames:
        raise DynavitError("no frames to run")
    p = _Policies(dm, controller, budgets, policies, others, score or _top1)
    load_frame = int(load_at * len(budgets)) if load_at is not None else None
    rng = np.random.default_rng(seed)
    # side by side: each frame, every policy in a fresh random order; else one pass per policy, as
    # deployed: nothing else runs between its frames
    passes = [p.names] if interleave else [[name] for name in p.names]
    with tqdm(total=len(budgets) * len(p.names), desc="trace", unit="frame", disable=not progress,
              dynamic_ncols=True) as bar, torch.inference_mode():
        for names in passes:
            p.warm(frames[0][0], warmup)
            with contextlib.ExitStack() as stack:
                for i, budget in enumerate(budgets):
                    if i == load_frame:
                        stack.enter_context(CompetingLoad(load_threads, load_duty))
                    for k in rng.permutation(len(names)) if interleave else range(len(names)):
                        p.step(names[k], frames[i % len(frames)], float(budget))
                        bar.update(1)
    p.measure_quality(quality_of, held_out_of)
    return SimResult(np.asarray(budgets), p.stats, load_frame, p.slowdown)


def path_quality(dm: Any, data: Any, known: Mapping[ExecConfig, float] | None = None) -> Callable[..., float]:
    """Quality of any path on ``data`` (a sweep's ``CachedData``), measured as the sweep measures it, cached.

    ``known``: qualities already measured on exactly these images (a store's rows), not measured again.

    ``quality(cfg, next_config=nxt)`` keeps the activations ``cfg`` shares with ``nxt`` for the next
    call, as a sweep does (``Evaluator``'s prefix reuse, bit-identical): a rescue ladder's rungs
    differ only from the first block they drop. ``quality.evaluator`` counts what was reused.
    """
    evaluator, cache = Evaluator(dm, data, measure_latency=False), dict(known or {})

    def quality(cfg: ExecConfig, next_config: ExecConfig | None = None) -> float:
        if cfg not in cache:
            previous = dm.exec_config
            cache[cfg] = evaluator.measure(cfg, next_config=next_config).quality
            dm.configure(previous)
        return cache[cfg]

    quality.evaluator = evaluator  # type: ignore[attr-defined]
    return quality


def hindsight_bounds(res: SimResult, entries: Sequence[Entry], target_miss: float = 0.01) -> dict[str, dict]:
    """What a controller could reach on this trace, knowing more than any controller can, but less than the oracle.

    Read off the oracle's pass, where every path ran on every frame. Each frame's *speed* is the
    median over paths of measured / median; a path's *own jitter* is what is left. A bound picks,
    per frame, argmax quality - price x P(own jitter > slack), with the jitter distribution of the
    whole trace and the best price in hindsight whose realised miss rate is at most ``target_miss``:

    - ``speed known``: knows each frame's speed, not the path's own jitter on it;
    - ``speed unknown``: knows neither (only the trace's overall distribution).

    The oracle also sees the own jitter of the one run it keeps; no controller can, since a run's
    time is known only after it ran. The gap between the oracle and ``speed known`` is that part.
    Returns ``{name: {"miss_rate", "menu_quality", "price"}}``; empty without an oracle pass.
    """
    oracle = res.policies.get("oracle")
    if oracle is None or not oracle.menu_ms:
        return {}
    ms = np.asarray(oracle.menu_ms)  # frames x paths
    b = np.asarray(res.budgets[:len(ms)], float)
    q = np.array([e.quality for e in entries])
    base = np.median(ms, axis=0)
    ratio = ms / base
    cheapest = int(np.argmin(base))
    out = {}
    for name, speed in (("speed known", np.median(ratio, axis=1)), ("speed unknown", np.ones(len(ms)))):
        own = np.sort((ratio / speed[:, None]).ravel())
        slack = b[:, None] / (base[None, :] * speed[:, None])
        risk = share_above(own, slack)
        tried = []
        for price in np.geomspace(0.01, 1e4, 81):
            score = np.where(risk <= 0.5, q[None, :] - price * risk, -np.inf)
            pick = np.where(np.isfinite(score).any(axis=1), score.argmax(axis=1), cheapest)
            tried.append({"miss_rate": float(np.mean(ms[np.arange(len(ms)), pick] > b)),
                          "menu_quality": float(np.mean(q[pick])), "price": float(price)})
        fit = [t for t in tried if t["miss_rate"] <= target_miss]  # none: even the safest price misses more
        out[name] = max(fit, key=lambda t: t["menu_quality"]) if fit else min(tried, key=lambda t: t["miss_rate"])
    return out


def plot_trace(res: SimResult, path: str | Path, policies: Sequence[str] = ("controller", "uncorrected", "oracle"),
               ) -> Path:
    """Budget and measured latency per frame for a few policies, with the load start marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    ax.plot(res.budgets, color="black", lw=1.5, label="budget")
    for name in policies:
        if name in res.policies:
            ax.plot(res.policies[name].latency_ms, lw=0.8, alpha=0.8, label=name)
    if res.load_frame is not None:
        ax.axvline(res.load_frame, color="red", ls="--", lw=1, label="competing load starts")
    ax.set_xlabel("frame")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
