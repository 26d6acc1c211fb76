"""A deadline inside a forward pass: when a run falls behind, drop its least important remaining blocks.

A controller picks a path from predictions made before the run. The machine's speed it can
track from run to run, but each run also has its own jitter (a preemption, a burst of cache
misses), and that shows only while the run is under way. A ``Deadline`` attached to a family
model is consulted before each block. It measures the run's own pace so far (elapsed time over
the share of the path that ran), projects the rest of the path at that pace, and when the
projection overruns the budget it finds the least important remaining blocks (the calibration's
ranking) whose dropping would make the rest fit, at most ``max_drop`` in a run. The block about
to run is dropped if it is one of them; the others are decided at their turn, with more of the
run seen. Nothing is dropped when no such set fits: a run that would miss anyway keeps its
accuracy, since a late answer is no worse for having been computed in full. What ran is an
ordinary config (``executed``): the path with the dropped blocks skipped, whose accuracy can be
measured like any other.

A dropped block that reduces tokens (pruning or merging) still reduces them, from its input's
keys (``ExecConfig.skip_keep_tokens``, about a twelfth of a ViT block's MACs): the blocks after
it were timed, and their accuracy measured, with fewer tokens, and a path that reduces tokens at
every block (ToMe's schedules, per-image merging) would otherwise have nothing to drop. What such
a dropped block still takes (the keys, the matching) is ``residual``, measured by
``runtime.timing.profile_menu``; without it the projection would count the whole share as saved
(on DeiT-tiny's token paths three drops save 16-19 % of the time, not the 22-24 % of their shares).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynavit.errors import DynavitError


@dataclass
class Deadline:
    """A latency budget for one forward pass, counted from ``start`` (a ``time.perf_counter()`` value).

    ``shares``: each stage's share of the path's usual time, ``[before block 0, block 0, ..., block n-1,
    after]`` (``Controller.profile`` measures them);
    ``expected_ms``: the path's usual time now (the controller's median prediction). The pace is
    the run's own, shrunk towards this one as if ``prior_weight`` of the path had run at it: the
    first blocks after a path switch run with cold caches, and alone they would raise false alarms.
    Without it the pace is the run's own;
    ``order``: blocks from least to most important, the order in which they may be dropped;
    ``safety``: the projection of the rest is multiplied by this before it is compared;
    ``max_drop``: the most blocks one run may drop. Blocks are dropped only when that makes the
    projection fit: a run that would miss anyway keeps its accuracy;
    ``residual``: per stage, like ``shares``, the share of the path's time a dropped block still
    takes (a block that reduces tokens still reduces them); None: nothing.
    """

    budget_ms: float
    shares: Sequence[float]
    order: Sequence[int]
    start: float = field(default_factory=time.perf_counter)
    safety: float = 1.05
    max_drop: int | None = None  # most blocks one run may drop (None: a quarter of them)
    residual: Sequence[float] | None = None  # per stage: what a dropped block still takes
    expected_ms: float | None = None  # the path's usual time now; the pace starts from it
    prior_weight: float = 0.25
    sync: Callable[[], None] | None = None  # e.g. torch.cuda.synchronize: kernels run asynchronously on a GPU
    dropped: list[int] = field(default_factory=list)  # blocks this run skipped to make the deadline
    done: float = 0.0  # expected share of the path that has run
    elapsed_ms: float = 0.0  # at the last check
    _rest: float | None = None  # share of the path still to run, once the plan is seen
    _candidates: list[int] = field(default_factory=list)  # ``droppable(plan, order)``
    _plan: Any = None  # the plan of the run, once seen: ``executed`` reads its token layers

    def __post_init__(self) -> None:
        if not self.budget_ms > 0 or self.safety <= 0:
            raise DynavitError("a deadline needs a positive budget and safety factor")
        if len(self.shares) < 3 or min(self.shares) < 0 or not sum(self.shares) > 0:
            raise DynavitError("deadline shares: one non-negative share per stage (before, blocks, after)")
        total = float(sum(self.shares))
        self.shares = [s / total for s in self.shares]
        if self.residual is not None and len(self.residual) != len(self.shares):
            raise DynavitError("deadline residual: one share per stage, as many as shares")
        self.residual = [0.0] * len(self.shares) if self.residual is None else [r / total for r in self.residual]
        self.done = self.shares[0]

    def skip(self, i: int, plan: Any) -> bool:
        """Called before block ``i`` of ``plan`` runs: True when the block is to be skipped.

        Only block ``i`` is decided, at the last moment, when the most of the run's pace is known:
        it is dropped when it belongs to the least important set of remaining blocks whose
        dropping makes the projection fit. Later blocks are decided when their turn comes.
        """
        blocks = plan.blocks
        if self._rest is None:  # share of the path still to run: the runnable blocks and the last stage
            self._rest = self.shares[-1] + sum(self.shares[1 + j] for j, b in enumerate(blocks) if b.attn or b.mlp)
            self._candidates, self._plan = droppable(plan, self.order), plan
            if self.max_drop is None:
                self.max_drop = default_max_drop(len(blocks))
        if not (blocks[i].attn or blocks[i].mlp):
            return False  # not in the path: the model runs what the plan says (a compensated skip)
        now = self._now()
        if i > 0 and self._behind(now, self._rest):
            rest, need = self._rest, []
            for j in self._candidates:
                if not self._behind(now, rest) or len(self.dropped) + len(need) >= self.max_drop:
                    break  # fits, or may drop no more
                if j >= i:  # not run yet
                    need.append(j)
                    rest -= self.shares[1 + j] - self.residual[1 + j]
            if i in need and not self._behind(now, rest):  # only when it saves the deadline
                self.dropped.append(i)
                self.done += self.residual[1 + i]  # the reduction it still runs
                self._rest -= self.shares[1 + i]
                return True
        self.done += self.shares[1 + i]
        self._rest -= self.shares[1 + i]
        return False

    def _behind(self, now: float, rest: float) -> bool:
        """Whether ``rest`` more of the path, at the pace so far, would end after the budget."""
        if self.done <= 0:
            return False
        if self.expected_ms:  # the usual pace counts as ``prior_weight`` of the path already run
            pace = (now + self.prior_weight * self.expected_ms) / (self.done + self.prior_weight)
        else:
            pace = now / self.done
        return now + rest * pace * self.safety > self.budget_ms

    def finish(self) -> None:
        """Called after the last stage: counts it, so that ``full_ms`` is the pace over the whole run."""
        self._now()
        self.done += self.shares[-1]

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        self.elapsed_ms = (time.perf_counter() - self.start) * 1e3
        return self.elapsed_ms

    @property
    def full_ms(self) -> float:
        """The whole path's time at this run's pace: what the controller learns the machine's speed from."""
        return self.elapsed_ms / self.done if self.done > 0 else self.elapsed_ms

    def executed(self, config: Any) -> Any:
        """The config that actually ran: ``config`` with the dropped blocks skipped (``with_dropped``)."""
        return with_dropped(config, self.dropped, self._plan)


@contextlib.contextmanager
def attached(impl: Any, deadline: Deadline | None, start: float) -> Iterator[None]:
    """The forwards of family model ``impl`` in the body carry ``deadline``, counted from ``start``; detached after."""
    if deadline is not None:
        deadline.start = start
    impl.deadline = deadline
    try:
        yield
    finally:
        impl.deadline = None


def with_dropped(config: Any, blocks: Sequence[int], plan: Any) -> Any:
    """``config`` (resolved: ``plan``) with ``blocks`` dropped: the path a run that dropped them executed.

    A dropped block that reduces tokens goes to ``skip_keep_tokens`` (it still reduces them), any
    other to ``skip_blocks``.
    """
    if not blocks:
        return config
    thin = {j for j in blocks if plan.blocks[j].token_op}
    out = config.replace(skip_blocks=tuple(sorted(set(config.skip_blocks) | (set(blocks) - thin))))
    return out.replace(skip_keep_tokens=tuple(sorted(set(config.skip_keep_tokens) | thin))) if thin else out


def dropped_blocks(chosen: Any, executed: Any) -> tuple[int, ...]:
    """The blocks a run of ``chosen`` dropped, read off the path it ``executed`` (``with_dropped``'s inverse)."""
    def skipped(c: Any) -> set[int]:
        return set(c.skip_blocks) | set(c.skip_keep_tokens)

    return tuple(sorted(skipped(executed) - skipped(chosen)))


def default_max_drop(num_blocks: int) -> int:
    """A quarter of the blocks: beyond that a ViT's accuracy falls steeply (docs/architecture.md)."""
    return num_blocks // 4


def droppable(plan: Any, order: Sequence[int]) -> list[int]:
    """The blocks of ``plan`` a deadline may drop, in ``order``: those that run."""
    blocks = plan.blocks
    return [j for j in order if 0 <= j < len(blocks) and (blocks[j].attn or blocks[j].mlp)]


def timed_stages(impl: Any, x: Any, sync: Callable[[], None] | None = None) -> list[float]:
    """One forward of a family model that runs in stages (``begin``/``step``/``end``), each stage timed (ms)."""
    marks = [time.perf_counter()]
    carry = impl.begin(x)
    for i in range(len(impl.blocks)):
        if sync is not None:
            sync()
        marks.append(time.perf_counter())
        carry = impl.step(carry, i)
    if sync is not None:
        sync()
    marks.append(time.perf_counter())
    impl.end(carry)
    if sync is not None:
        sync()
    marks.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:], strict=False)]


def stage_shares(stage_ms: Sequence[Sequence[float]]) -> list[float]:
    """Median time of each stage over several timed runs, as shares of the path's total."""
    med = np.median(np.asarray(stage_ms, float), axis=0)
    total = float(med.sum())
    if not total > 0:
        raise DynavitError("stage times must add up to a positive time")
    return (med / total).tolist()
