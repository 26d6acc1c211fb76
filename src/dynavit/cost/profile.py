"""Where a model spends its FLOPs, and where it spends its time.

``profile()`` runs the model once under the counting mode (exact MACs per operator class
and per module), then several times under the timing mode (measured time per operator
class), and once more uninstrumented for the real latency. Both shares sit side by side
so a user can see that FLOP share does not predict time share.

Time per class comes from timing each op inside the same dispatch mode that classifies
it, not from ``torch.profiler``: the profiler names an ``addmm`` but cannot tell a weight
matmul (``linear``) from an activation matmul (``attention``). A fused attention kernel's
time, softmax included, is attributed to ``attention``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from dynavit.cost.flops import CLASSES, MAC_CLASSES, CostMode, ModuleStack, count
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel, load

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ClassCost:
    macs: int
    flops: int
    share: float  # share of total MACs (0 for classes without MACs)
    flop_share: float  # share of total FLOPs, all classes
    time_ms: float
    time_share: float
    ops: int


@dataclass
class ModuleCost:
    name: str
    type: str
    depth: int
    macs: int
    flops: int
    share: float
    time_ms: float


@dataclass
class Profile:
    """One model, one input shape, one device: counts, measured times and memory."""

    model: str
    device: str
    dtype: str
    input_shape: tuple[int, ...]
    total_macs: int
    total_flops: int
    classes: dict[str, ClassCost]
    modules: list[ModuleCost]
    params: int
    param_bytes: int
    activation_peak_bytes: int
    activation_written_bytes: int
    latency_ms: float  # uninstrumented median
    latency_p95_ms: float
    instrumented_ms: float  # median sum of per-op times under the timing mode
    repeats: int
    torch_version: str = torch.__version__
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["total_gmacs"] = self.total_macs / 1e9
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        """Inverse of ``to_json`` (e.g. a profile kept in a result store); ValueError if unreadable."""
        names = {f.name for f in fields(cls)}
        try:
            kw = {k: v for k, v in d.items() if k in names}
            kw["classes"] = {c: ClassCost(**v) for c, v in kw["classes"].items()}
            kw["modules"] = [ModuleCost(**m) for m in kw.get("modules", [])]
            kw["input_shape"] = tuple(kw["input_shape"])
            return cls(**kw)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"the stored profile is not readable by this dynavit ({e})") from None

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    def module(self, name: str) -> ModuleCost:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def table(self, *, title: str | None = None) -> Table:
        """A rich Table of the operator classes: MACs, FLOP share and time share."""
        t = Table(title=title or f"{self.model}  {'x'.join(map(str, self.input_shape))}  {self.device} {self.dtype}")
        for col in ("class", "GMACs", "GFLOPs", "MAC share", "FLOP share", "time ms", "time share"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for name, c in self.classes.items():
            if not (c.flops or c.time_ms):
                continue
            t.add_row(name, f"{c.macs / 1e9:.4f}", f"{c.flops / 1e9:.4f}", f"{c.share:.1%}",
                      f"{c.flop_share:.1%}", f"{c.time_ms:.2f}", f"{c.time_share:.1%}")
        t.add_row("total", f"{self.total_macs / 1e9:.4f}", f"{self.total_flops / 1e9:.4f}", "100%", "100%",
                  f"{self.instrumented_ms:.2f}", "100%", style="bold")
        t.caption = (f"latency (uninstrumented) p50 {self.latency_ms:.2f} ms, p95 {self.latency_p95_ms:.2f} ms; "
                     f"params {self.params / 1e6:.2f} M; peak activations {self.activation_peak_bytes / 2**20:.1f} MiB")
        return t

    def module_table(self, *, max_depth: int = 2, top: int = 30) -> Table:
        t = Table(title="modules (inclusive)")
        for col in ("module", "type", "GMACs", "share", "time ms"):
            t.add_column(col, justify="left" if col in ("module", "type") else "right")
        rows = [m for m in self.modules if m.depth <= max_depth]
        for m in sorted(rows, key=lambda m: -m.macs)[:top]:
            t.add_row(m.name, m.type, f"{m.macs / 1e9:.4f}", f"{m.share:.1%}", f"{m.time_ms:.2f}")
        return t

    def plot(self, path: str | Path) -> Path:
        """Bar chart PNG: FLOP share vs measured time share per operator class."""
        import matplotlib  # here, not at the top: ``import dynavit`` imports this module and needs no plotting

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n, c in self.classes.items() if c.flops or c.time_ms]
        flop = [100 * self.classes[n].flop_share for n in names]
        tshare = [100 * self.classes[n].time_share for n in names]
        fig, ax = plt.subplots(figsize=(8, 4.2))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], flop, width=0.4, label="FLOP share")
        ax.bar([x + 0.2 for x in xs], tshare, width=0.4, label=f"time share ({self.device})")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_ylabel("% of total")
        ax.set_title(f"{Path(self.model).name}  {'x'.join(map(str, self.input_shape))}  {self.device} {self.dtype}: "
                     f"{self.total_macs / 1e9:.2f} GMAC, {self.latency_ms:.1f} ms")
        ax.legend()
        for x, f, s in zip(xs, flop, tshare, strict=True):
            ax.text(x - 0.2, f + 0.5, f"{f:.0f}", ha="center", fontsize=8)
            ax.text(x + 0.2, s + 0.5, f"{s:.0f}", ha="center", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DynavitError(f"device {device!r} requested but CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DynavitError(f"unknown device {device!r} (use cpu or cuda)") from None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profile(
    model: Any,
    *,
    input_size: tuple[int, int] | None = None,
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
    warmup: int = 2,
    repeats: int | None = None,
    time_budget_s: float = 8.0,
) -> Profile:
    """Profile ``model`` (a DynamicModel, an nn.Module, or a name for ``dynavit.load``).

    ``repeats=None`` picks as many timed repetitions as fit ``time_budget_s`` (3 to 50).
    """
    if isinstance(model, (str, Path)):
        model = load(model)
    if dtype not in _DTYPES:
        raise DynavitError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
    if batch < 1:
        raise DynavitError(f"batch must be >= 1, got {batch}")
    dev = _resolve_device(device)
    module, source, size, call = _target(model, input_size)

    module.to(device=dev, dtype=_DTYPES[dtype]).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=g).to(device=dev, dtype=_DTYPES[dtype])

    def run() -> Any:
        return call(x)

    try:
        counted = count(module, run)
    except RuntimeError as e:  # a shape the model rejects deep inside its forward
        first = str(e).splitlines()[0]
        raise DynavitError(f"{source} cannot run an input of shape {tuple(x.shape)}: {first}") from None

    with torch.inference_mode(False), torch.no_grad():
        latencies = _latencies(run, dev, warmup, repeats, time_budget_s)
        n = len(latencies)
        op_times = _timed_runs(module, run, n, dev)
    return _assemble(source, dev, dtype, tuple(x.shape), module, counted, op_times, latencies, n)


def _target(model: Any, input_size: tuple[int, int] | None
            ) -> tuple[nn.Module, str, tuple[int, ...], Callable[[torch.Tensor], Any]]:
    """(module to instrument, its name, input height and width, what to call on an input)."""
    if isinstance(model, DynamicModel):
        size = tuple(input_size) if input_size else model.input_size
        model.check_input_size(*size)
        return model.module, model.source, size, model
    if isinstance(model, nn.Module):
        if input_size is None:
            raise DynavitError("input_size is required when profiling a bare nn.Module")
        return model, type(model).__name__, tuple(input_size), model
    raise DynavitError(f"cannot profile {type(model).__name__}: pass a model name, DynamicModel or nn.Module")


def _latencies(run: Callable[[], Any], dev: torch.device, warmup: int, repeats: int | None,
               time_budget_s: float) -> list[float]:
    """Uninstrumented seconds of each timed run, after ``warmup`` runs; one untimed probe sizes ``repeats=None``."""
    for _ in range(warmup):
        run()
    _sync(dev)
    t0 = time.perf_counter()
    run()
    _sync(dev)
    one = time.perf_counter() - t0
    n = repeats or int(min(50, max(3, time_budget_s / 2 / max(one, 1e-4))))
    latencies = []
    for _ in range(n):
        _sync(dev)
        t0 = time.perf_counter()
        run()
        _sync(dev)
        latencies.append(time.perf_counter() - t0)
    return latencies


def _timed_runs(module: nn.Module, run: Callable[[], Any], n: int, dev: torch.device) -> list[list[float]]:
    """Per-op seconds for each of ``n`` instrumented runs (same op order as the count)."""
    stack = ModuleStack(module)
    out: list[list[float]] = []
    try:
        for _ in range(n):
            mode = CostMode(module, stack, time_ops=True, device=dev.type)
            with mode:
                run()
            _sync(dev)
            out.append(mode.op_seconds())
    finally:
        stack.remove()
    return out


def _assemble(source, dev, dtype, shape, module, counted, op_times, latencies, n) -> Profile:
    records = counted.records
    # median per op over the runs: robust to a noisy repetition, same op order every run
    per_op = [statistics.median(ts) for ts in zip(*op_times, strict=True)] if op_times else [0.0] * len(records)
    if len(per_op) != len(records):
        per_op = [0.0] * len(records)  # data-dependent control flow: fall back to no per-op time
    cls_macs: dict[str, int] = defaultdict(int)
    cls_flops: dict[str, int] = defaultdict(int)
    cls_time: dict[str, float] = defaultdict(float)
    cls_ops: dict[str, int] = defaultdict(int)
    mod_macs: dict[str, int] = defaultdict(int)
    mod_flops: dict[str, int] = defaultdict(int)
    mod_time: dict[str, float] = defaultdict(float)
    for rec, secs in zip(records, per_op, strict=True):
        # an op's time goes to its MAC class if it has one (fused SDPA -> attention)
        time_cls = next((c.cls for c in rec.costs if c.cls in MAC_CLASSES), rec.costs[0].cls)
        cls_time[time_cls] += secs
        cls_ops[time_cls] += 1
        for c in rec.costs:
            cls_macs[c.cls] += c.macs
            cls_flops[c.cls] += c.flops
        macs = sum(c.macs for c in rec.costs)
        flops = sum(c.flops for c in rec.costs)
        for name in set(rec.modules):
            mod_macs[name] += macs
            mod_flops[name] += flops
            mod_time[name] += secs
    total_macs = sum(cls_macs.values())
    total_flops = sum(cls_flops.values())
    total_time = sum(cls_time.values())
    classes = {
        c: ClassCost(
            macs=cls_macs[c], flops=cls_flops[c],
            share=cls_macs[c] / total_macs if total_macs else 0.0,
            flop_share=cls_flops[c] / total_flops if total_flops else 0.0,
            time_ms=1e3 * cls_time[c], time_share=cls_time[c] / total_time if total_time else 0.0,
            ops=cls_ops[c],
        )
        for c in CLASSES
    }
    modules = [
        ModuleCost(name=m, type=counted.module_types[m], depth=m.count(".") + 1, macs=mod_macs[m],
                   flops=mod_flops[m], share=mod_macs[m] / total_macs if total_macs else 0.0,
                   time_ms=1e3 * mod_time[m])
        for m in counted.module_order
    ]
    params = sum(p.numel() for p in module.parameters())
    lat = sorted(latencies)
    return Profile(
        model=source, device=str(dev), dtype=dtype, input_shape=shape, total_macs=total_macs,
        total_flops=total_flops, classes=classes, modules=modules, params=params,
        param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
        activation_peak_bytes=counted.peak_activation_bytes,
        activation_written_bytes=counted.written_activation_bytes,
        latency_ms=1e3 * statistics.median(lat), latency_p95_ms=1e3 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        instrumented_ms=1e3 * total_time, repeats=n,
    )
