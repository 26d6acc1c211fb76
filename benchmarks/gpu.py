"""Deployed paths on a CUDA GPU, in one command: eager vs compiled vs ONNX Runtime per menu path.

Per path of each model's menu (``deploy_paths.MENUS``: DeiT-tiny and the committed CamVid
SegFormer-B0): latency at batch 1 and throughput at a large batch (64 by default), PyTorch
eager, ``DynamicModel.compile`` (inductor) and ONNX Runtime (the CUDA provider when
onnxruntime-gpu is installed, else the CPU one, as recorded), timed side by side in a fresh
random order each repetition with a CUDA sync after every call; energy per image from NVML's
energy counter, over enough back-to-back batches to span many of the counter's updates (its
update interval is measured first, by polling); and the FLOP-share vs time-share table of each
path (``dynavit.cost.profile``: which operator classes take the time the FLOPs do not predict).
Writes ``benchmarks/results/gpu-<device>.json``. Without a GPU it exits with code 2, unless
``--allow-cpu`` (a smoke run of the same code on the CPU, e.g. with ``--tiny``). Run:

    .venv/bin/python benchmarks/gpu.py [--models deit-tiny segformer-b0-camvid] [--batch 64]
    .venv/bin/python benchmarks/gpu.py --allow-cpu --tiny --backend eager   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from deploy_paths import MENUS, RESULTS, SOURCES, interleaved

import dynavit
from dynavit.config import ExecConfig
from dynavit.cost import profile
from dynavit.cost.energy import EnergyMeter
from dynavit.deploy.onnxrt import run_session, session

TINY_MENU = {"default": ExecConfig(), "mlp 0.5": ExecConfig(mlp_width=0.5), "1 head": ExecConfig(heads=1),
             "prune keep 0.5 @1,2": ExecConfig(token_keep=0.5, token_layers=(1, 2))}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MENUS), choices=list(MENUS))
    ap.add_argument("--batch", type=int, default=64, help="the large batch, for throughput and energy (>= 32)")
    ap.add_argument("--budget-s", type=float, default=20.0, help="timing per (model, batch) table")
    ap.add_argument("--energy-s", type=float, default=3.0, help="least time per energy reading")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU where there is no GPU (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random ViT instead of the models (smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu-<device>.json")
    args = ap.parse_args(argv)
    if args.batch < 2:
        ap.error("--batch must be at least 2")
    return args


def device_or_exit(allow_cpu: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_cpu:
        return torch.device("cpu")
    print("benchmarks/gpu.py needs a CUDA GPU and none is visible to torch "
          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
          "use --allow-cpu for a smoke run on the CPU", file=sys.stderr)
    raise SystemExit(2)


def device_name(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synced(fn: Callable[[], object], dev: torch.device) -> Callable[[], object]:
    if dev.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return run


def counter_interval_s(meter: EnergyMeter | None, poll_s: float = 1.0) -> float | None:
    """Median time between changes of NVML's energy counter, polled while the GPU is busy."""
    if meter is None:
        return None
    changes, last, t0 = [], meter.read_mj(), time.perf_counter()
    busy = torch.randn(2048, 2048, device="cuda")
    while time.perf_counter() - t0 < poll_s:
        busy @ busy  # noqa: B018 - load, so the counter moves
        v = meter.read_mj()
        if v != last:
            changes.append(time.perf_counter())
            last = v
    gaps = [b - a for a, b in zip(changes, changes[1:], strict=False)]
    return statistics.median(gaps) if gaps else None


def energy_per_image(fn: Callable[[], object], batch: int, meter: EnergyMeter | None, least_s: float) -> dict | None:
    """mJ per image over back-to-back calls lasting at least ``least_s`` (many counter updates)."""
    if meter is None:
        return None
    calls, t0 = 0, time.perf_counter()
    meter.start()
    with torch.inference_mode():
        while time.perf_counter() - t0 < least_s or calls < 3:
            fn()
            calls += 1
    mj = meter.stop()
    return {"mj_per_image": mj / (calls * batch), "calls": calls, "seconds": time.perf_counter() - t0}


def runners(dm: dynavit.DynamicModel, menu: dict[str, ExecConfig], args: argparse.Namespace, folder: Path,
            dev: torch.device) -> tuple[dict[str, dict[str, Callable[[torch.Tensor], object]]], dict]:
    """Per path: {runtime: fn(x)}, and what was set up (compile time, ONNX providers)."""
    setup: dict = {}
    fns: dict[str, dict[str, Callable[[torch.Tensor], object]]] = {}
    for label, cfg in menu.items():
        fns[label] = {"eager": lambda x, cfg=cfg: dm.configure(cfg)(x)}
    if not args.no_compile:
        t0 = time.perf_counter()
        cp = dm.compile(list(menu.values()), backend=args.backend)
        setup["compile_s"] = time.perf_counter() - t0
        setup["compile_failed"] = {str(k): v for k, v in cp.failed.items()}
        for label, cfg in menu.items():
            fns[label]["compiled"] = lambda x, cfg=cfg: cp.configure(cfg)(x)
    if not args.no_onnx:
        import onnxruntime

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers() and (dev.type == "cuda" or p.startswith("CPU"))]
        setup["onnx_providers"] = providers
        for k, (label, cfg) in enumerate(menu.items()):
            sess = session(dm.export(folder / f"{k:02d}.onnx", cfg), providers)
            fns[label]["onnxruntime"] = lambda x, s=sess: run_session(s, x)
    return fns, setup


def shares(dm: dynavit.DynamicModel, cfg: ExecConfig, dev: torch.device) -> dict[str, dict[str, float]]:
    """FLOP share vs time share per operator class (batch 1), from one profile of the path."""
    dm.configure(cfg)
    p = profile(dm, device=dev.type, time_budget_s=2.0)
    return {c: {"flop_share": v.flop_share, "time_share": v.time_share, "time_ms": v.time_ms}
            for c, v in p.classes.items()}


def bench(name: str, dm: dynavit.DynamicModel, menu: dict[str, ExecConfig], args: argparse.Namespace,
          dev: torch.device, meter: EnergyMeter | None) -> dict:
    dm.to(dev).eval()
    with tempfile.TemporaryDirectory() as tmp:
        fns, setup = runners(dm, menu, args, Path(tmp), dev)
        rows = {label: {"config": cfg.to_dict()} for label, cfg in menu.items()}
        for b in (1, args.batch):
            x = dm.example_input(b)
            variants = {f"{label}|{rt}": synced(lambda f=f, x=x: f(x), dev)
                        for label, per in fns.items() for rt, f in per.items()}
            med = interleaved(variants, args.budget_s)
            for key, m in med.items():
                label, rt = key.split("|")
                r = rows[label].setdefault(rt, {})
                if b == 1:
                    r["latency_ms_b1"], r["latency_p90_ms_b1"] = m["median_ms"], m["p90_ms"]
                else:
                    r[f"images_per_s_b{b}"] = 1e3 * b / m["median_ms"]
                    r[f"energy_b{b}"] = energy_per_image(variants[key], b, meter, args.energy_s)
            print(f"{name} batch {b}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in med.items()), flush=True)
    for label, cfg in menu.items():
        rows[label]["classes"] = shares(dm, cfg, dev)
    return {"model": name, "setup": setup, "paths": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dev = device_or_exit(args.allow_cpu)
    meter = EnergyMeter.for_device(dev)
    interval = counter_interval_s(meter)
    if interval is not None:
        args.energy_s = max(args.energy_s, 50 * interval)
    if args.tiny:
        from transformers import ViTConfig

        models = {"tiny-vit": (dynavit.from_config(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                             num_hidden_layers=3, num_attention_heads=2,
                                                             intermediate_size=64, num_labels=10)), TINY_MENU)}
    else:
        models = {n: (dynavit.load(SOURCES[n]()), MENUS[n]) for n in args.models}
    t0 = time.time()
    results = [bench(n, dm, menu, args, dev, meter) for n, (dm, menu) in models.items()]
    out = args.out or RESULTS / f"gpu-{device_name(dev)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__, "batch": args.batch, "backend": args.backend,
        "energy_counter_interval_s": interval, "energy_least_s": args.energy_s if meter else None,
        "onnxruntime_inputs": "numpy arrays from the host (copied to the device by ONNX Runtime)",
        "minutes": (time.time() - t0) / 60, "models": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
