"""Trace-driven run of the budget controller on DeiT-tiny (real inferences on this CPU).

Uses the store written by ``benchmarks/sweep_deit.py``; before each run the controller re-measures its
candidate menu here (``Controller(Menu.from_store(..., wide=True)).profile(x)``). For each thread count, 400 frames:
1. a random-walk trace whose budgets vary over 4x: misses and top-1 of the controller against
   always-default, always-smallest, the best static config for the median budget, the oracle, and the
   controller on the store's menu without profiling;
2. the same with a competing CPU load started half-way: the corrected controller against the
   uncorrected one.
The controller uses the priced rule and runs each frame under a deadline (blocks dropped when a run
falls behind); the same profiled controller without the deadline, and with the per-frame quantile rule,
run beside it for comparison.
Writes the ``simulate`` section (benchmarks/results/) and docs/img/simulate_load.png:

    .venv/bin/python benchmarks/simulate_deit.py [--frames 400] [--threads 2 1]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import torch
from docsection import write_section

from dynavit.runtime import Controller, Menu
from dynavit.runtime.simulate import default_bounds, hindsight_bounds, make_trace, path_quality, plot_trace, simulate
from dynavit.sweep.engine import device_name

ROOT = Path(__file__).resolve().parents[1]


def table(res, title: str) -> list[str]:
    load = res.load_frame is not None
    head = "| policy | misses | miss % | top-1 % | menu top-1 % | p50 ms | rescued |"
    head += " misses before load | misses under load |" if load else ""
    lines = [title, "", head, "|---" * (9 if load else 7) + "|"]
    for r in res.table():
        line = (f"| {r['policy']} | {r['misses']} | {100 * r['miss_rate']:.1f} | {100 * r['top1']:.1f} | "
                f"{100 * r['menu_top1']:.1f} | {r['latency_p50_ms']:.1f} | {r['rescued']} |")
        if load:
            line += f" {r['misses_before_load']} | {r['misses_under_load']} |"
        lines.append(line)
    return lines + [""]


def repeated(runs, title: str, bounds=None) -> list[str]:
    lines = [title, "", "| policy | misses (median, range) | miss % (median) | top-1 % (median, range) | "
             "menu top-1 % (median, range) | p50 ms | rescued (median) |", "|---|---|---|---|---|---|---|"]
    for name in runs[0].policies:
        rows = [next(r for r in run.table() if r["policy"] == name) for run in runs]
        m = [r["misses"] for r in rows]
        t = [100 * r["top1"] for r in rows]
        q = [100 * r["menu_top1"] for r in rows]
        rate = 100 * np.median(m) / rows[0]["frames"]
        lines.append(f"| {name} | {int(np.median(m))} ({min(m)}–{max(m)}) | {rate:.1f}"
                     f" | {np.median(t):.1f} ({min(t):.1f}–{max(t):.1f}) | {np.median(q):.1f} ({min(q):.1f}–"
                     f"{max(q):.1f}) | {np.median([r['latency_p50_ms'] for r in rows]):.1f} | "
                     f"{int(np.median([r['rescued'] for r in rows]))} |")
    for name in bounds[0] if bounds else ():
        m = [100 * b[name]["miss_rate"] for b in bounds]
        q = [100 * b[name]["menu_top1"] for b in bounds]
        lines.append(f"| bound: {name} | | {np.median(m):.1f} | | {np.median(q):.1f} ({min(q):.1f}–{max(q):.1f}) | | |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench-sweep" / "deit-tiny.db")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the no-load trace (the machine is noisy)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="CPU threads; one table each")
    ap.add_argument("--profile-runs", type=int, default=30, help="rounds of the menu profile before each run")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="policies take turns on each frame (paired); --no-interleave: one pass each")
    args = ap.parse_args()
    menu = Menu.from_store(args.store, wide=True)  # the model as the sweep measured it; candidates to profile
    dm, data = menu.model, menu.images()
    frames = data.frames()
    probe = frames[0][0]
    quality_of = path_quality(dm, data)  # of the paths a deadline cuts short, cached over runs

    def profiled() -> Controller:  # as deployed: the menu re-measured at start-up, the drops' cost measured
        ctrl = Controller(menu).profile(probe, runs=args.profile_runs)
        return ctrl.measure_rescue(quality_of)

    def same_start(ctrl: Controller, **changes) -> Controller:  # same menu, same measured tail: a paired comparison
        twin = copy.deepcopy(ctrl, {id(dm): dm})
        twin.options = dataclasses.replace(twin.options, **changes)
        return twin


    cmd = "`.venv/bin/python benchmarks/simulate_deit.py " + " ".join(sys.argv[1:]) + "`"
    stored = Controller.from_store(args.store, model=dm)  # the store's own latency front, not re-measured
    paired = ("The policies run side by side: on each frame every policy takes one turn, in a fresh random order "
              "(`simulate(..., interleave=True)`), so that all of them meet the same machine; this VM's speed drifts "
              "over minutes, and passes made one after another compared poorly." if args.interleave else
              "Each policy makes its own pass over the trace (as deployed: nothing else runs between its frames).")
    lines = [f"Machine: {device_name(torch.device('cpu'))}; {dt.date.today()}; command: {cmd}.", "",
             f"Frames: the sweep's {len(frames)} held-out ImageNet sample photos, one per frame, batch 1. Menu: "
             f"at the start of each run the controller re-measures its candidates ({args.profile_runs} shuffled "
             "rounds): the Pareto fronts of the DeiT-tiny sweep store by MACs and by stored latency together, and "
             "keeps the front by the p95 it measured (`Controller(Menu.from_store(..., wide=True)).profile(x)`). "
             "The *stored menu* "
             f"row is the controller on the store's own latency front ({len(stored.entries)} configs, as measured "
             "during the sweep) with no profiling. Budgets: a random walk in log space over 4x, from 1.2x the "
             f"cheapest measured path's p95. {paired} The oracle runs every path on each frame and keeps the most "
             "accurate one that fitted. A miss is a measured forward time above the frame's budget. The "
             "*controller* uses the priced rule (spends the 1 % miss allowance where it buys the most top-1) and "
             "runs each frame under a deadline: when a run falls behind, it drops up to 3 of the least important "
             "remaining blocks if that makes it fit (*rescued* frames; their menu top-1 is the top-1 of the path "
             "that actually ran, measured on the sweep's images). Before the trace it measures what 1, 2 and 3 "
             "drops cost each path (`measure_rescue`), and chooses by expected top-1 with rescues counted. The "
             "*no deadline* row is the same controller (same profile) without deadlines and without the ladder; "
             "the *quantile rule* row starts from the same profile (same menu, same measured tail, same ladder "
             "and deadlines) and chooses by the 99th-percentile prediction, frame by frame. *Menu top-1* is the "
             "mean over frames of the chosen path's top-1 on all the sweep's images: the same comparison without "
             "the luck of which image each frame drew. The two *bound* rows are read off the oracle's runs (every "
             "path timed on every frame) with the best price in hindsight at <= 1 % misses: *speed known* knows "
             "each frame's machine speed (the median over paths of measured / median) but not a run's own jitter, "
             "*speed unknown* knows only the trace's overall jitter distribution (`hindsight_bounds`). No "
             "controller can see a run's own jitter before it runs; the oracle does, and the gap between the "
             "oracle and *speed known* is that part.", ""]
    loaded = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs, menus, bounds = [], [], []
        for _ in range(args.repeats):
            ctrl = profiled()
            others = {"no deadline": same_start(ctrl, rescue=False), "quantile rule": same_start(ctrl, rule="quantile"),
                      "stored menu": Controller.from_store(args.store, model=dm)}
            if not menus:
                lo, hi = default_bounds(ctrl)
                budgets = make_trace("random-walk", args.frames, lo, hi, seed=0)
            menus.append(len(ctrl.entries))
            runs.append(simulate(dm, ctrl, frames, budgets, others=others, quality_of=quality_of,
                                 interleave=args.interleave, seed=len(runs), progress=False))
            bounds.append(hindsight_bounds(runs[-1], ctrl.entries))
        lines += repeated(runs, f"**{threads} thread{'s' if threads > 1 else ''}**, no competing load "
                                f"({args.frames} frames, budgets {lo:.1f}-{hi:.1f} ms, {args.repeats} runs of the "
                                f"same trace, menus of {'/'.join(map(str, menus))} configs; median and range over "
                                "runs):", bounds)
        if threads == args.threads[0]:
            ctrl = profiled()
            loaded = simulate(dm, ctrl, frames, budgets, load_at=0.5, quality_of=quality_of,
                              policies=("controller", "uncorrected", "oracle", "static"),
                              interleave=args.interleave, progress=False)
            plot_trace(loaded, ROOT / "docs" / "img" / "simulate_load.png")
            load_title = (f"{threads} thread{'s' if threads > 1 else ''}, competing load from frame "
                          f"{loaded.load_frame}: a second process multiplying matrices on one core, busy half of "
                          "every 10 ms:")
    if loaded is not None:
        lines += table(loaded, load_title)
        lines += ["![budget and latency per frame under load](img/simulate_load.png)"]
    body = "\n".join(lines)
    write_section("simulate", "Budget controller on a trace (DeiT-tiny, CPU)", body)
    print(body)


if __name__ == "__main__":
    main()
