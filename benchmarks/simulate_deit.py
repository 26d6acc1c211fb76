"""Trace-driven run of the budget controller on DeiT-tiny (real inferences on this CPU).

Uses the store written by ``benchmarks/sweep_deit.py``. Two runs of 400 frames:
1. a random-walk trace whose budgets vary over 4x: misses and top-1 of the controller against
   always-default, always-smallest, the best static config for the median budget, and the oracle;
2. the same with a competing CPU load started half-way: the corrected controller against the
   uncorrected one.
Writes the ``simulate`` section of docs/benchmarks.md and docs/img/simulate_load.png:

    .venv/bin/python benchmarks/simulate_deit.py [--frames 400]
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import torch
from docsection import write_section

from dynavit.runtime import Controller
from dynavit.runtime.simulate import default_bounds, make_trace, plot_trace, simulate
from dynavit.sweep import ResultStore, SweepTarget
from dynavit.sweep.engine import device_name

ROOT = Path(__file__).resolve().parents[1]


def table(res, title: str) -> list[str]:
    load = res.load_frame is not None
    head = "| policy | misses | miss % | top-1 % | p50 ms |"
    head += " misses before load | misses under load |" if load else ""
    lines = [title, "", head, "|---" * (7 if load else 5) + "|"]
    for r in res.table():
        line = (f"| {r['policy']} | {r['misses']} | {100 * r['miss_rate']:.1f} | {100 * r['top1']:.1f} | "
                f"{r['latency_p50_ms']:.1f} |")
        if load:
            line += f" {r['misses_before_load']} | {r['misses_under_load']} |"
        lines.append(line)
    return lines + [""]


def repeated(runs, title: str) -> list[str]:
    lines = [title, "", "| policy | misses (median, range) | miss % (median) | top-1 % (median, range) | p50 ms |",
             "|---|---|---|---|---|"]
    for name in runs[0].policies:
        rows = [next(r for r in run.table() if r["policy"] == name) for run in runs]
        m = [r["misses"] for r in rows]
        t = [100 * r["top1"] for r in rows]
        rate = 100 * np.median(m) / rows[0]["frames"]
        lines.append(f"| {name} | {int(np.median(m))} ({min(m)}–{max(m)}) | {rate:.1f}"
                     f" | {np.median(t):.1f} ({min(t):.1f}–{max(t):.1f}) | "
                     f"{np.median([r['latency_p50_ms'] for r in rows]):.1f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench-sweep" / "deit-tiny.db")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the no-load trace (the machine is noisy)")
    args = ap.parse_args()
    with ResultStore(args.store, readonly=True) as rs:
        target = SweepTarget(**rs.last_target())
    dm, data, _, _ = target.build()
    frames = data.frames()
    ctrl = Controller.from_store(args.store, model=dm)
    lo, hi = default_bounds(ctrl)
    budgets = make_trace("random-walk", args.frames, lo, hi, seed=0)
    runs = [simulate(dm, Controller.from_store(args.store, model=dm), frames, budgets, progress=False)
            for _ in range(args.repeats)]
    ctrl2 = Controller.from_store(args.store, model=dm)
    loaded = simulate(dm, ctrl2, frames, budgets, load_at=0.5,
                      policies=("controller", "uncorrected", "oracle", "static"), progress=False)
    plot_trace(loaded, ROOT / "docs" / "img" / "simulate_load.png")
    lines = [f"Machine: {device_name(torch.device('cpu'))}; {dt.date.today()}; command: "
             f"`.venv/bin/python benchmarks/simulate_deit.py --frames {args.frames}`.", "",
             f"Menu: the {len(ctrl.entries)}-config Pareto front (by batch-1 latency p95) of the DeiT-tiny sweep "
             f"store; frames: the sweep's {len(frames)} held-out ImageNet sample photos, one per frame, batch 1. "
             f"Budgets: a random walk in log space between {lo:.1f} and {hi:.1f} ms (4x). Each policy makes its "
             "own pass over the trace (as deployed: nothing else runs between its frames); the oracle runs every "
             "path on each frame and keeps the most accurate one that fitted. A miss is a measured forward time "
             "above the frame's budget.", ""]
    lines += repeated(runs, f"No competing load ({args.frames} frames, {args.repeats} runs of the same trace; "
                            "median and range over runs):")
    lines += table(loaded, f"Competing load from frame {loaded.load_frame}: a second process multiplying "
                           "matrices on one core, busy half of every 10 ms:")
    lines += ["![budget and latency per frame under load](img/simulate_load.png)"]
    body = "\n".join(lines)
    write_section("simulate", "Budget controller on a trace (DeiT-tiny, CPU)", body)
    print(body)


if __name__ == "__main__":
    main()
