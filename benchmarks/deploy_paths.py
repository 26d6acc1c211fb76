"""Deployed paths on CPU: ONNX Runtime vs PyTorch eager, compiled vs eager, and the compile count while switching.

Per menu path of DeiT-tiny (the real weights, ``DYNAVIT_ASSETS``) and of the committed CamVid
SegFormer-B0 (``models/segformer-b0-camvid``): the path is exported as a sliced ONNX file
(size, parameters, largest difference to PyTorch), then PyTorch eager and ONNX Runtime are timed
side by side, interleaved in a fresh random order every repetition, at batch 1 and 32; medians
and ratios. Then a few DeiT-tiny paths are compiled (``DynamicModel.compile``, inductor), timed
against eager the same way, and cycled through at several batch sizes while Dynamo's compile
count is read before and after. Writes ``benchmarks/results/deploy_paths-cpu.json``. Run:

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deploy_paths.py [--threads 2] [--no-compile]

On a machine whose cores are shared with other work, OpenMP's default spin-waiting barriers
make PyTorch's 2-thread eager runs several times slower than they are on an idle machine
(DeiT-tiny at batch 1: seconds instead of tens of ms at a load average of 13 on 2 cores);
``OMP_WAIT_POLICY=PASSIVE`` removes that artefact (ONNX Runtime's sessions do not spin either).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import dynavit
from dynavit.assets import deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.deploy.compiled import compile_count
from dynavit.deploy.onnxrt import run_session, session
from dynavit.deploy.slice import parameter_count, path_module

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEGFORMER = ROOT / "models" / "segformer-b0-camvid"
MENUS: dict[str, dict[str, ExecConfig]] = {
    "deit-tiny": {
        "default": ExecConfig(),
        "mlp 0.5": ExecConfig(mlp_width=0.5),
        "2 heads, mlp 0.5": ExecConfig(heads=2, mlp_width=0.5),
        "skip 4 blocks": ExecConfig(skip_blocks=(2, 5, 8, 11)),
        "prune keep 0.5 @3,6,9": ExecConfig(token_keep=0.5, token_layers=(3, 6, 9)),
        "merge keep 0.84 @all": ExecConfig(token_keep=0.84, token_layers=tuple(range(12)), token_method="merge"),
        "resolution 160": ExecConfig(resolution=160),
    },
    "segformer-b0-camvid": {
        "default": ExecConfig(),
        "decoder 0.5": ExecConfig(decoder_width=0.5),
        "branches 0,1 + decoder 0.5": ExecConfig(decoder_branches=(0, 1), decoder_width=0.5),
        "mlp 0.5, 1 head": ExecConfig(mlp_width=0.5, heads=1),
    },
}
COMPILED = ("default", "2 heads, mlp 0.5", "prune keep 0.5 @3,6,9")
SOURCES = {"deit-tiny": deit_tiny_source, "segformer-b0-camvid": lambda: str(SEGFORMER)}


def interleaved(variants: dict[str, Callable[[], object]], budget_s: float, *, seed: int = 0,
                reps: tuple[int, int] = (3, 30)) -> dict[str, dict[str, float]]:
    """Median and p90 ms per variant, each repetition running every variant once in a fresh random order.

    The number of repetitions fills ``budget_s`` (within ``reps``), from one timed warm-up round.
    """
    rng = np.random.default_rng(seed)
    names = list(variants)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for fn in variants.values():  # warm-up, and the cost of one round
            fn()
    n = int(min(reps[1], max(reps[0], budget_s / max(time.perf_counter() - t0, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for _ in range(n):
            for i in rng.permutation(len(names)):
                t = time.perf_counter()
                variants[names[i]]()
                times[names[i]].append(1e3 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.quantile(v, 0.9)), "reps": len(v)}
            for k, v in times.items()}


def eager_fn(dm: dynavit.DynamicModel, cfg: ExecConfig, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        dm.configure(cfg)
        return dm(x)

    return run


def export_menu_files(dm: dynavit.DynamicModel, menu: dict[str, ExecConfig], folder: Path) -> dict[str, dict]:
    """Each path as a sliced ONNX file: its session, size, parameters and largest difference to PyTorch."""
    out = {}
    x = dm.example_input(2)
    full = parameter_count(dm.module)
    for label, cfg in menu.items():
        path = dm.export(folder / f"{len(out):02d}.onnx", cfg)
        sess = session(path)
        dm.configure(cfg)
        with torch.inference_mode():
            ref = dm(x)
        diff = float((run_session(sess, x) - ref).abs().max() / ref.abs().max())
        kept = parameter_count(path_module(dm, cfg))
        out[label] = {"session": sess, "mb": path.stat().st_size / 1e6, "parameters": kept, "parameters_full": full,
                      "max_diff_rel": diff}
    return out


def ort_vs_eager(name: str, batches: list[int], budget_s: float) -> list[dict]:
    dm = dynavit.load(SOURCES[name]())
    menu, rows = MENUS[name], []
    with tempfile.TemporaryDirectory() as tmp:
        files = export_menu_files(dm, menu, Path(tmp))
        for b in batches:
            x = dm.example_input(b)
            variants: dict[str, Callable[[], object]] = {}
            for label, cfg in menu.items():
                variants[f"{label}|eager"] = eager_fn(dm, cfg, x)
                variants[f"{label}|onnxruntime"] = lambda s=files[label]["session"], x=x: run_session(s, x)
            med = interleaved(variants, budget_s)
            for label in menu:
                e, o = med[f"{label}|eager"], med[f"{label}|onnxruntime"]
                info = {k: v for k, v in files[label].items() if k != "session"}
                rows.append({"model": name, "path": label, "config": menu[label].to_dict(), "batch": b,
                             "eager_ms": e["median_ms"], "onnxruntime_ms": o["median_ms"],
                             "ort_over_eager": o["median_ms"] / e["median_ms"], "reps": e["reps"], **info})
                print(f"{name:20s} b={b:<3d} {label:28s} eager {e['median_ms']:8.1f} ms  ORT {o['median_ms']:8.1f} ms"
                      f"  ratio {rows[-1]['ort_over_eager']:.2f}  {info['mb']:.1f} MB", flush=True)
    return rows


def compiled_vs_eager(batches: list[int], budget_s: float, backend: str) -> dict:
    """A few DeiT-tiny paths compiled once each; eager vs compiled, then the compile count while cycling them."""
    dm = dynavit.load(deit_tiny_source())
    cfgs = {k: MENUS["deit-tiny"][k] for k in COMPILED}
    before = compile_count()
    t0 = time.perf_counter()
    cp = dm.compile(list(cfgs.values()), backend=backend)
    warm_s = time.perf_counter() - t0
    rows = []
    for b in batches:
        x = dm.example_input(b)
        variants: dict[str, Callable[[], object]] = {}
        for label, cfg in cfgs.items():
            variants[f"{label}|eager"] = eager_fn(dm, cfg, x)
            variants[f"{label}|compiled"] = lambda cfg=cfg, x=x: cp.configure(cfg)(x)
        med = interleaved(variants, budget_s)
        for label in cfgs:
            e, c = med[f"{label}|eager"], med[f"{label}|compiled"]
            rows.append({"path": label, "batch": b, "eager_ms": e["median_ms"], "compiled_ms": c["median_ms"],
                         "compiled_over_eager": c["median_ms"] / e["median_ms"], "reps": e["reps"]})
            print(f"compiled b={b:<3d} {label:28s} eager {e['median_ms']:8.1f} ms  compiled {c['median_ms']:8.1f} ms  "
                  f"ratio {rows[-1]['compiled_over_eager']:.2f}", flush=True)
    warmed = compile_count()
    calls = 0
    with torch.inference_mode():
        for _ in range(3):
            for cfg in cfgs.values():
                for b in (1, 3, 32, 2):
                    cp.configure(cfg)(dm.example_input(b))
                    calls += 1
    return {"backend": backend, "paths": len(cfgs), "warm_up_s": warm_s, "graphs_at_warm_up": warmed - before,
            "failed": {str(k): v for k, v in cp.failed.items()}, "cycled_calls": calls,
            "compiles_while_cycling": compile_count() - warmed, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=list(MENUS), choices=list(MENUS))
    ap.add_argument("--budget-s", type=float, default=40.0, help="timing per (model, batch) table")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for the compiled part")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "deploy_paths-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    result = {"machine": f"CPU, {args.threads} torch / ONNX Runtime threads (shared with other users: compare ratios)",
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # PASSIVE: no spinning OpenMP barriers when
              "load_average_at_start": os.getloadavg()[0], "torch": torch.__version__,  # the cores are oversubscribed
              "onnxruntime": __import__("onnxruntime").__version__,
              "ort_vs_eager": [r for name in args.models for r in ort_vs_eager(name, args.batches, args.budget_s)],
              "compiled": None}
    write(args.out, result, t0)  # the ONNX Runtime part is kept even if compiling is cut short
    if not args.no_compile:
        result["compiled"] = compiled_vs_eager(args.batches, args.budget_s, args.backend)
        write(args.out, result, t0)


def write(out: Path, result: dict, t0: float) -> None:
    result["minutes"] = (time.time() - t0) / 60
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
