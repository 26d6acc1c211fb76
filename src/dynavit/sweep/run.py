"""The sweep: ask a strategy for configs, measure the new ones, store every row as it lands.

``SweepTarget`` says how to build the model and the data; a Ray worker rebuilds the same
target from it, so the local and the Ray backend measure identical things.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dynavit.config import ExecConfig
from dynavit.cost import profile
from dynavit.data import open_dataset
from dynavit.data.datasets import file_sha1
from dynavit.errors import DynavitError
from dynavit.sweep import stats
from dynavit.sweep.engine import CachedData, Evaluator, cache_dataset
from dynavit.sweep.measured import calibration_identity, load_model, model_fingerprint
from dynavit.sweep.space import SearchSpace
from dynavit.sweep.store import ResultStore, Row
from dynavit.sweep.strategies import Point, Score, Strategy, make
from dynavit.sweep.variants import VariantSpace, sweep_space


@dataclass
class SweepTarget:
    """Everything that decides what a row means: model, calibration, data and protocol."""

    model: str
    data: str
    layout: str | None = None
    calibration: str | None = None
    limit: int | None = None
    exclude_calibration_images: bool = True
    skip_bad: bool = False
    batch_size: int = 32
    device: str = "cpu"
    n_boot: int = 1000
    seed: int = 0
    latency_repeats: int = 50  # a p95 of fewer runs is close to their max
    reuse_prefix: bool = True
    measure_latency: bool = True
    multiplexers: tuple[str, ...] = ()  # folders of multiplexed models, run by configs with mux=N
    variants: dict[str, str] = field(default_factory=dict)  # name -> model, run by configs with variant=name
    variant_calibrations: dict[str, str] = field(default_factory=dict)  # name -> the variant's calibration folder

    def __post_init__(self) -> None:
        # paths that exist are recorded absolute: the store is read again from other folders
        self.data = _absolute(self.data)
        self.model = _absolute(self.model)
        self.calibration = None if self.calibration is None else _absolute(self.calibration)
        self.multiplexers = tuple(_absolute(m) for m in self.multiplexers)  # a list when read back from the store
        self.variants = {str(k): _absolute(v) for k, v in (self.variants or {}).items()}
        self.variant_calibrations = {str(k): _absolute(v) for k, v in (self.variant_calibrations or {}).items()}

    def load_model(self) -> Any:
        """The model this target measures: its source with calibration, multiplexed models and variants."""
        return load_model(self.model, calibration=self.calibration, multiplexers=self.multiplexers,
                          variants=self.variants, device=self.device, variant_calibrations=self.variant_calibrations)

    def build(self, *, progress: bool = False) -> tuple[Any, CachedData, Evaluator, int]:
        """(model, cached data, evaluator, number of calibration images left out)."""
        dm = self.load_model()
        data, excluded = self.images(dm, progress=progress)
        ev = Evaluator(dm, data, latency_repeats=self.latency_repeats, reuse_prefix=self.reuse_prefix,
                       measure_latency=self.measure_latency, n_boot=self.n_boot, seed=self.seed)
        return dm, data, ev, excluded

    def images(self, dm: Any, *, progress: bool = False) -> tuple[CachedData, int]:
        """The sweep's images, decoded for ``dm`` (the calibration's own left out), and how many were left out.

        ``dm`` is the model as the sweep measured it (``load_model``; ``Menu.images`` passes the menu's).
        """
        if not Path(self.data).exists():
            raise DynavitError(f"the sweep's images are no longer at {self.data}; pass --data with the folder "
                               "they are in now")
        dataset, excluded = open_dataset(self.data, layout=self.layout), 0
        # every measured model's calibration images: a variant calibrated on them would look better on them too
        calibs = [m.calibration for m in (dm, *dm.variants.values()) if m.calibration is not None]
        used = {h for c in calibs for h in (c.image_hashes or ())}
        if (self.calibration or self.variant_calibrations) and self.exclude_calibration_images and used:
            keep = [i for i in range(len(dataset)) if file_sha1(dataset.path(i)) not in used]
            excluded = len(dataset) - len(keep)
            dataset = dataset.subset(keep)
        dataset = dataset.limit(self.limit)
        return cache_dataset(dm, dataset, batch_size=self.batch_size, skip_bad=self.skip_bad,
                             progress=progress), excluded


def _absolute(path: str | Path) -> str:
    """``path`` made absolute when it names something on disk (a hub id or preset stays as it is)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def identity(target: SweepTarget, dm: Any, data: CachedData) -> dict[str, Any]:
    return {
        "model": str(dm.source),
        "model_fingerprint": model_fingerprint(dm),
        "calibration": calibration_identity(dm),
        "dataset_fingerprint": f"{data.fingerprint()} ({data.n} images)",
        "task": data.task,
        "metric": stats.main_metric(data.task),
        "protocol": {"batch_size": target.batch_size, "n_boot": target.n_boot, "seed": target.seed,
                     "device": target.device, "input_size": list(dm.input_size)},
    }


# ---------------------------------------------------------------------------------------- backends


def _sharing_order(cfgs: Sequence[ExecConfig], dm: Any) -> list[int]:
    """Order configs so that those executing the same leading blocks (of the same model) run back to back."""
    def key(i: int) -> tuple:
        plan = dm.plan_for(cfgs[i])
        blocks = tuple((b.attn, b.mlp, b.heads, b.mlp_dim, b.token_op or "", b.similarity) for b in plan.blocks)
        token = (plan.token_keep, plan.token_r, plan.token_fuse, plan.token_threshold or 0.0)
        return (cfgs[i].variant or "", plan.resolution or (0, 0), blocks, token)
    return sorted(range(len(cfgs)), key=key)


class LocalBackend:
    """Measures configs one after another in this process."""

    name = "local"

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def measure(self, cfgs: Sequence[ExecConfig], labels: Sequence[str], strategy: str) -> Iterator[Row]:
        order = _sharing_order(cfgs, self.evaluator.dm)  # latencies timed round-robin per group
        yield from self.evaluator.measure_round([cfgs[i] for i in order], [labels[i] for i in order], strategy)

    def close(self) -> None:
        pass


class RayBackend:
    """Spreads configs over Ray actors, each holding its own model and cached data."""

    name = "ray"
    GROUP = 4  # configs an actor times together, round-robin (the local backend's group)

    def __init__(self, target: SweepTarget, dm: Any, *, address: str | None = None,
                 workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise DynavitError("--backend ray needs Ray: pip install 'dynavit[ray]'") from None
        self.ray, self.dm = ray, dm
        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, ignore_reinit_error=True)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise DynavitError(f"cannot reach the Ray cluster at {address}: {e}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = workers or max(1, cpus)
        remote = ray.remote(num_cpus=1)(_RemoteEvaluator)
        self.actors = [remote.remote(target) for _ in range(n)]

    def measure(self, cfgs: Sequence[ExecConfig], labels: Sequence[str], strategy: str) -> Iterator[Row]:
        """Each actor takes a contiguous share (prefix sharing) and times it round-robin in groups of
        ``GROUP``, as the local backend does; a group's rows are stored as soon as it is done."""
        order = _sharing_order(cfgs, self.dm)
        n = len(self.actors)
        chunks = [order[k * len(order) // n:(k + 1) * len(order) // n] for k in range(n)]
        futures = []
        for actor, chunk in zip(self.actors, chunks, strict=True):
            for g in range(0, len(chunk), self.GROUP):
                part = chunk[g:g + self.GROUP]
                then = cfgs[chunk[g + self.GROUP]] if g + self.GROUP < len(chunk) else None
                futures.append(actor.measure_round.remote([cfgs[i] for i in part], [labels[i] for i in part],
                                                          strategy, then))
        pending = list(futures)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield from self.ray.get(done[0])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()


class _RemoteEvaluator:
    def __init__(self, target: SweepTarget) -> None:
        self.evaluator = target.build()[2]

    def measure_round(self, cfgs: list[ExecConfig], labels: list[str], strategy: str,
                      then: ExecConfig | None) -> list[Row]:
        return list(self.evaluator.measure_round(cfgs, labels, strategy, group=len(cfgs), then=then))


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class SweepSummary:
    store: Path
    measured: int = 0  # configs measured by this run
    reused: int = 0  # configs found in the store
    invalid: int = 0
    total: int = 0
    seconds: float = 0.0
    excluded_calibration_images: int = 0
    n_images: int = 0
    rows: list[Row] = field(default_factory=list)


def run_sweep(target: SweepTarget, *, space: str | Path | dict = "default", strategy: str = "random",
              budget: int | None = None, store: str | Path = "results.db", backend: str = "local",
              address: str | None = None, workers: int | None = None, seed: int = 0, progress: bool = True,
              on_row: Callable[[Row], None] | None = None, precisions: Sequence[str] = ()) -> SweepSummary:
    """Run (or resume) a sweep; every measured row is in the store before the next one starts.
    ``precisions``: also measure every config at these precisions (``sweep.space.load_space``)."""
    if backend not in ("local", "ray"):
        raise DynavitError(f"unknown backend {backend!r} (choose local or ray)")
    t0 = time.perf_counter()
    rs = ResultStore(store)  # before any work: an unusable or busy store is refused at once
    try:
        rs.acquire()
        dm, data, evaluator, excluded = target.build(progress=progress)
        search = sweep_space(space, dm, precisions)
        strat = make(strategy, search.shape, budget, seed)
        summary = SweepSummary(Path(store), excluded_calibration_images=excluded, n_images=data.n)
        rs.bind(identity(target, dm, data))
        if target.measure_latency:
            _profile_default(rs, dm, target.device)
        run_id = rs.start_run({"target": asdict(target), "space": search.to_json(), "strategy": strategy,
                               "budget": budget, "backend": backend, "seed": seed})
        runner: LocalBackend | RayBackend = (LocalBackend(evaluator) if backend == "local" else
                                             RayBackend(target, dm, address=address, workers=workers))
        bar = tqdm(total=budget or search.size, desc=f"sweep ({strategy})", unit="cfg", disable=not progress,
                   dynamic_ncols=True)
        sweep = _Sweep(rs, search, target, evaluator, run_id, strategy, summary, bar, on_row)
        _drive(sweep, strat, runner)
        summary.rows = rs.rows()
    finally:
        rs.close()
    summary.total = len(summary.rows)
    summary.seconds = time.perf_counter() - t0
    return summary


def _profile_default(rs: ResultStore, dm: Any, device: str) -> None:
    """The default path's operator-class profile, once per store (reports break its latency down)."""
    if ExecConfig() not in rs.profiles():
        dm.configure(ExecConfig())
        rs.add_profile(ExecConfig(), profile(dm, device=device, time_budget_s=4.0).to_json())


def _drive(sweep: _Sweep, strat: Strategy, runner: LocalBackend | RayBackend) -> None:
    """Rounds until the strategy stops; the run ends marked done, interrupted or failed, the backend closed."""
    status = "failed"
    try:
        while sweep.round(strat, runner):
            pass
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        sweep.bar.close()
        runner.close()
        with contextlib.suppress(DynavitError):  # a read-only or full store: the first error says so
            sweep.rs.finish_run(sweep.run_id, status)


@dataclass
class _Sweep:
    """A running sweep: where rows go, what they mean, and what has been counted so far."""

    rs: ResultStore
    search: SearchSpace | VariantSpace
    target: SweepTarget
    evaluator: Evaluator
    run_id: int
    strategy: str
    summary: SweepSummary
    bar: Any  # tqdm
    on_row: Callable[[Row], None] | None = None
    default_row: Row | None = None

    def __post_init__(self) -> None:
        self.default_row = self.rs.get(ExecConfig())

    def round(self, strat: Strategy, runner: LocalBackend | RayBackend) -> bool:
        """One ask/tell round: stored configs answered from the store, new ones measured; False when done."""
        points = strat.ask()
        if not points:
            return False
        results, todo = self._triage(points)
        if self.default_row is None and todo:  # deltas need the default measured first
            self._measure_default(todo, results, strat.default)
        cfgs = list(todo)
        for row in runner.measure(cfgs, [todo[c][1] for c in cfgs], self.strategy):
            self._store(row)
            results[todo[row.config][0]] = (row.quality, row.macs)
            if self.on_row:
                self.on_row(row)
        strat.tell(results)
        return True

    def _triage(self, points: Sequence[Point]) -> tuple[dict[Point, Score | None], dict[ExecConfig, tuple[Point, str]]]:
        """Scores of invalid and stored points, and the configs still to measure with their points and labels."""
        results: dict[Point, Score | None] = {}
        todo: dict[ExecConfig, tuple[Point, str]] = {}
        for p in points:
            try:
                cfg = self.search.config(p)
                self.evaluator.dm.plan_for(cfg)  # against the space of the model (variant) it names
            except DynavitError:
                results[p] = None
                self.summary.invalid += 1
                continue
            row = self.rs.get(cfg)
            if row is not None:
                results[p] = (row.quality, row.macs)
                self.summary.reused += 1
                self.bar.update(1)
            elif cfg in todo:
                results[p] = None  # two points, one config (levels that coincide)
            else:
                todo[cfg] = (p, self.search.describe(p))
        return results, todo

    def _measure_default(self, todo: dict[ExecConfig, tuple[Point, str]], results: dict[Point, Score | None],
                         default: Point) -> None:
        """The default config, here and first (whatever the backend): every other row's delta is against it."""
        cfg = ExecConfig()
        label = todo.pop(cfg, (None, "default"))[1]
        row = next(iter(LocalBackend(self.evaluator).measure([cfg], [label], self.strategy)))
        self.default_row = self._store(row)
        results[default] = (row.quality, row.macs)

    def _store(self, row: Row) -> Row:
        _store_row(self.rs, row, self.default_row, self.evaluator.data.task, self.target, self.run_id)
        self.summary.measured += 1
        self.bar.update(1)
        return row


def _store_row(rs: ResultStore, row: Row, default: Row | None, task: str, target: SweepTarget,
               run_id: int) -> Row:
    if default is None:
        row.delta, row.delta_lo, row.delta_hi = 0.0, 0.0, 0.0
    else:
        row.delta, row.delta_lo, row.delta_hi = stats.paired_delta(
            row.per_image, default.per_image, task, target.n_boot, target.seed)
    row.run_id = run_id
    rs.add(row)
    return row


def measure_configs(store: str | Path, cfgs: Sequence[ExecConfig], labels: Sequence[str] | None = None, *,
                    strategy: str = "", latency: bool = True, progress: bool = True) -> int:
    """Measure configs the store lacks, with the store's own model, data and protocol.

    For tools that derive new configs from stored ones (the accelerator DSE rounds channel
    counts to a vector width): the rows are comparable with every other row of the store.
    ``latency=False`` skips the CPU latency and throughput timing (quality and MACs only). Latencies
    are timed round-robin per group of configs, as a sweep's are, so a drifting machine shows.
    """
    with ResultStore(store, readonly=True) as rs:
        target = SweepTarget(**{**rs.last_target(), **({} if latency else {"measure_latency": False})})
    rs = ResultStore(store)
    try:
        rs.acquire()
        dm, data, evaluator, _ = target.build(progress=progress)
        rs.bind(identity(target, dm, data))
        default_row = rs.get(ExecConfig())
        if default_row is None:
            raise DynavitError(f"{store} has no row for the default config; run `dynavit sweep` first")
        names = dict(zip(cfgs, labels or [""] * len(cfgs), strict=True))
        todo = [c for c in names if rs.get(c) is None]
        if not todo:
            return 0
        for c in todo:
            dm.plan_for(c)
        run_id = rs.start_run({"target": asdict(target), "configs": [c.to_dict() for c in todo], "strategy": strategy})
        with tqdm(total=len(todo), desc=f"measuring {strategy or 'configs'}", unit="cfg", disable=not progress) as bar:
            for row in LocalBackend(evaluator).measure(todo, [names[c] for c in todo], strategy):  # timed round-robin
                _store_row(rs, row, default_row, data.task, target, run_id)
                bar.update()
        rs.finish_run(run_id, "done")
        return len(todo)
    finally:
        rs.close()
