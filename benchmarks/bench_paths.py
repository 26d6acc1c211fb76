"""Execution-path speed: stock transformers vs dynavit's default path vs half-MAC paths per knob family.

Everything for one model and batch size is timed in ONE run, interleaved round-robin (each
repetition times every variant once), and reported as medians and ratios to the default
path, so machine noise hits all variants alike. Also times ``configure()``. Writes the
``paths-<device>`` section (benchmarks/results/). Run:

    .venv/bin/python benchmarks/bench_paths.py [--device cpu] [--batches 1 32] [--models deit-tiny segformer-b2 swin-t]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from docsection import DOC, write_section

import dynavit
from dynavit.assets import deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.cost import total_macs

RESULTS = Path(__file__).resolve().parent / "results"
MODELS: dict[str, tuple[str, tuple[int, int], dict[str, ExecConfig]]] = {
    "deit-tiny": (deit_tiny_source(), (224, 224), {
        "depth: skip 6 blocks": ExecConfig(skip_blocks=(1, 3, 5, 7, 9, 11)),
        "width: 2/3 heads, mlp 0.35": ExecConfig(heads=2, mlp_width=0.35),
        "tokens: prune keep 0.5 @3,6,9": ExecConfig(token_keep=0.5, token_layers=(3, 6, 9)),
        "tokens: merge keep 0.84 @all": ExecConfig(token_keep=0.84, token_layers=tuple(range(12)),
                                                   token_method="merge"),
        "resolution 160": ExecConfig(resolution=160),
    }),
    "segformer-b2": ("config:segformer-b2", (512, 512), {
        "decoder_width 0.5": ExecConfig(decoder_width=0.5),
        "decoder_branches 0,1 + width 0.75": ExecConfig(decoder_branches=(0, 1), decoder_width=0.75),
        "depth: skip 8 of 16 blocks": ExecConfig(skip_blocks=(1, 2, 4, 5, 6, 8, 9, 10)),
        "width: mlp 0.25, half heads": ExecConfig(mlp_width=0.25, heads=(1,) * 7 + (2,) * 6 + (4,) * 3),
        "resolution 352": ExecConfig(resolution=352),
    }),
    "swin-t": ("config:swin-t", (224, 224), {
        "depth: skip 6 of 12 blocks": ExecConfig(skip_blocks=(1, 3, 5, 7, 9, 11)),
        "width: half heads, mlp 0.4": ExecConfig(heads=(2, 2, 3, 3, 6, 6, 6, 6, 6, 6, 12, 12), mlp_width=0.4),
        "resolution 160": ExecConfig(resolution=160),
    }),
}


def time_round_robin(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per variant, timed interleaved."""
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(reps):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, batches: list[int], device: str, budget_s: float) -> list[dict]:
    src, size, cfgs = MODELS[name]
    dm = dynavit.load(src, device=device)
    ref = dm.reference
    rows = []
    for b in batches:
        x = torch.randn(b, 3, *size, device=device)
        macs = {}
        variants: dict[str, Callable[[], object]] = {"stock transformers": lambda x=x: ref(pixel_values=x)}

        def run(cfg: ExecConfig, x=x):
            dm.configure(cfg)
            return dm(x)

        for label, cfg in {"dynavit default": ExecConfig(), **cfgs}.items():
            variants[label] = lambda cfg=cfg, run=run: run(cfg)
            dm.configure(cfg)
            macs[label] = total_macs(dm.module, lambda x=x: dm(x[:1]))
        macs["stock transformers"] = macs["dynavit default"]
        one = time_round_robin({"dynavit default": variants["dynavit default"]}, reps=1, warmup=1)["dynavit default"]
        reps = int(max(5, min(30, budget_s / (one * len(variants)))))
        med = time_round_robin(variants, reps=reps)
        base = med["dynavit default"]
        for label, t in med.items():
            rows.append({"model": name, "batch": b, "path": label,
                         "macs_vs_default": macs[label] / macs["dynavit default"], "median_ms": 1e3 * t,
                         "time_vs_default": t / base, "reps": reps})
            print(_markdown(rows[-1]))
    return rows


def _markdown(r: dict) -> str:
    return (f"| {r['model']} | {r['batch']} | {r['path']} | {r['macs_vs_default']:.2f} | {r['median_ms']:.1f} | "
            f"{r['time_vs_default']:.2f} |")


def configure_us() -> float:
    dm = dynavit.load("config:vit-t16")
    cfgs = [ExecConfig(), ExecConfig(heads=2, mlp_width=0.5), ExecConfig(token_keep=0.7)]
    for c in cfgs:
        dm.configure(c)
    ts = []
    for i in range(30000):
        c = cfgs[i % 3]
        t0 = time.perf_counter()
        dm.configure(c)
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--budget-s", type=float, default=60.0, help="time per (model, batch) table")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for name in args.models:
        batches = [b if name == "deit-tiny" or b <= 8 else 8 for b in args.batches]
        rows += bench_model(name, sorted(set(batches)), args.device, args.budget_s)
    us = configure_us()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    section = "\n".join([
        f"Machine: {dev}, torch {torch.__version__}. Date: {dt.date.today()}. Command: "
        f"`.venv/bin/python benchmarks/bench_paths.py --device {args.device} "
        f"--batches {' '.join(map(str, args.batches))}"
        f" --models {' '.join(args.models)}` ({(time.time() - t0) / 60:.1f} min). Medians of round-robin repetitions; "
        "SegFormer-B2 (512x512) and Swin-T (224x224) use random weights (speed does not depend on them) and batch 8 "
        "in place of 32 to keep the run short.",
        "",
        f"`configure()` median: **{us:.1f} µs** (30,000 switches among 3 configs).",
        "",
        "| model | batch | path | MACs vs default | ms | time vs default |",
        "|---|---|---|---|---|---|",
        *map(_markdown, rows),
    ])
    write_section(f"paths-{args.device}", f"Execution paths: speed ({args.device})", section)
    raw = RESULTS / f"bench_paths-{args.device}.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({"machine": dev, "torch": torch.__version__, "date": str(dt.date.today()),
                               "argv": sys.argv[1:], "configure_us": us, "rows": rows}, indent=1))
    print(f"configure {us:.1f} us; wrote {DOC} and {raw}")


if __name__ == "__main__":
    main()
