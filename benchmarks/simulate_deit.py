"""Trace-driven run of the budget controller on DeiT-tiny (real inferences on this CPU).

Uses the store written by ``benchmarks/sweep_deit.py``. The images that choose are kept apart from
the images that score: ``runtime.startup.start`` splits the sweep's images in two, measures the
menu's top-1 and the rescue ladders on one half, and the trace's frames are drawn from the other
half (the JSON records both image lists and their overlap, which must be 0). Before each run the
controller re-measures its candidate menu here (50 shuffled rounds). For each thread count,
``--frames`` frames (default 2,000) of a random-walk trace whose budgets vary over 4x: misses (with
exact 95 % intervals) and top-1 of the controller against always-default, always-smallest, the best
static config for the median budget, and the oracle; the same controller without the deadline and
with the per-frame quantile rule run beside it. Top-1 is reported three ways: realised on the
frames (the headline), and the chosen paths' top-1 on the menu images (in-sample) and on the frame
images (out-of-sample). ``--load`` adds a run with a competing CPU load from half-way.
Writes benchmarks/results/simulate_deit-cpu.json and its tables to benchmarks/results/simulate.md:

    .venv/bin/python benchmarks/simulate_deit.py [--frames 2000] [--threads 1 2] [--max-menu 6]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from docsection import write_section

from dynavit.runtime import Controller
from dynavit.runtime.simulate import hindsight_bounds, plot_trace, simulate
from dynavit.runtime.startup import start
from dynavit.runtime.traces import default_bounds, make_trace
from dynavit.sweep.engine import device_name

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("controller", "default", "smallest", "static", "oracle")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(res, title: str) -> list[str]:
    load = res.load_frame is not None
    head = ("| policy | misses | miss % [exact 95% CI] | top-1 % on the frames [95% CI] | menu top-1 %: menu images "
            "| frame images | p50 ms | rescued |")
    head += " misses before load | misses under load |" if load else ""
    lines = [title, "", head, "|---" * (10 if load else 8) + "|"]
    for r in res.table():
        (mlo, mhi), (tlo, thi) = r["miss_ci"], r["quality_ci"]
        line = (f"| {r['policy']} | {r['misses']} | {pct(r['miss_rate'])} [{pct(mlo)}, {pct(mhi)}] | "
                f"{pct(r['quality'])} [{pct(tlo)}, {pct(thi)}] | {pct(r['menu_quality'])} | "
                f"{pct(r['held_out_quality'])} | "
                f"{r['latency_p50_ms']:.1f} | {r['rescued']} |")
        if load:
            line += f" {r['misses_before_load']} | {r['misses_under_load']} |"
        lines.append(line)
    return lines + [""]


def thin(ctrl: Controller, k: int | None) -> Controller:
    """Keep at most ``k`` entries, spread along the front (cheapest and most accurate kept): a shorter oracle pass."""
    if k is None or len(ctrl.entries) <= k:
        return ctrl
    keep = sorted({int(round(i)) for i in np.linspace(0, len(ctrl.entries) - 1, k)})
    ctrl.entries = [ctrl.entries[i] for i in keep]
    return ctrl


def run(args, threads: int, load: bool = False) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    s = start(args.store, profile_runs=args.profile_runs, images=True, seed=args.seed)
    ctrl, dm = thin(s.controller, args.max_menu), s.model

    def same_start(**changes) -> Controller:  # same menu, same measured tail: a paired comparison
        twin = copy.deepcopy(ctrl, {id(dm): dm})
        twin.options = dataclasses.replace(twin.options, **changes)
        return twin

    others = {} if load or not args.others else {"no deadline": same_start(rescue=False),
                                                  "quantile rule": same_start(rule="quantile")}
    lo, hi = default_bounds(ctrl)
    budgets = make_trace("random-walk", args.frames, lo, hi, seed=args.seed)
    setup = time.perf_counter() - t0
    load_before = os.getloadavg()
    res = simulate(dm, ctrl, s.frames.frames(), budgets, others=others, quality_of=s.quality_of,
                   held_out_of=s.held_out_of, interleave=True, seed=args.seed, progress=False,
                   load_at=0.5 if load else None, policies=("controller", "uncorrected", "oracle", "static")
                   if load else POLICIES)
    rows = res.table()
    by = {r["policy"]: r for r in rows}
    c, o = by["controller"], by["oracle"]
    return {"threads": threads, "load": load, "frames": args.frames, "budgets_ms": [lo, hi],
            "menu": [{"config": e.label, "top1_menu_images": e.quality, "top1_frame_images": s.held_out_of(e.config),
                      "latency_p50_ms": e.latency_p50_ms, "latency_p95_ms": e.latency_p95_ms,
                      "ladder_saved_top1": [list(r) for r in e.ladder or ()]} for e in ctrl.entries],
            "policies": rows, "bounds": hindsight_bounds(res, ctrl.entries),
            "gap_to_oracle_pts": {"realised_top1_on_frames": 100 * (o["quality"] - c["quality"]),
                                  "menu_top1_in_sample": 100 * (o["menu_quality"] - c["menu_quality"]),
                                  "menu_top1_out_of_sample": 100 * (o["held_out_quality"] - c["held_out_quality"])},
            "n_menu_images": len(s.images["menu_images"]), "n_frame_images": len(s.images["frame_images"]),
            "menu_images": s.images["menu_images"], "frame_images": s.images["frame_images"],
            "overlap": s.images["overlap"], "setup_s": setup, "seconds": time.perf_counter() - t0,
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "_res": res}


def describe(r: dict) -> list[str]:
    g = r["gap_to_oracle_pts"]
    t = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
    title = (f"**{t}**{', competing load from frame ' + str(r['_res'].load_frame) if r['load'] else ''} "
             f"({r['frames']} frames drawn from {r['n_frame_images']} images; menu measured on {r['n_menu_images']} "
             f"others, overlap {r['overlap']}; budgets {r['budgets_ms'][0]:.1f}-{r['budgets_ms'][1]:.1f} ms; "
             f"{len(r['menu'])} paths on the menu; load average {r['load_average_before'][0]:.1f} before, "
             f"{r['load_average_after'][0]:.1f} after):")
    lines = table(r["_res"], title)
    lines += [f"Gap from the controller to the oracle: {g['realised_top1_on_frames']:+.1f} pts realised on the frames, "
              f"{g['menu_top1_out_of_sample']:+.1f} pts by the chosen paths' top-1 on the frame images, "
              f"{g['menu_top1_in_sample']:+.1f} pts by their top-1 on the menu images (in-sample).", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench-sweep" / "deit-tiny.db")
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="CPU threads; one table each")
    ap.add_argument("--profile-runs", type=int, default=50, help="rounds of the menu profile before each run")
    ap.add_argument("--max-menu", type=int, default=None, help="keep at most this many menu paths (a shorter run)")
    ap.add_argument("--load", action="store_true", help="also run with a competing load from half-way")
    ap.add_argument("--others", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the controller without deadlines and with the quantile rule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "simulate_deit-cpu.json")
    args = ap.parse_args()
    results = [run(args, t) for t in args.threads]
    if args.load:
        results.append(run(args, args.threads[0], load=True))
        plot_trace(results[-1]["_res"], ROOT / "docs" / "img" / "simulate_load.png")
    cmd = "`.venv/bin/python benchmarks/simulate_deit.py " + " ".join(sys.argv[1:]) + "`"
    lines = [f"Machine: {device_name(torch.device('cpu'))}, shared with other work (load averages below); "
             f"{dt.date.today()}; command: {cmd}. Raw numbers: `benchmarks/results/simulate_deit-cpu.json`.", "",
             "The sweep's images are split in two: the menu's top-1 and the rescue ladders are measured on one half, "
             "the frames come from the other (`runtime.startup.start`), so no frame was seen by a choice. The policies "
             "take turns on each frame in a fresh random order (`simulate(..., interleave=True)`). Budgets: a random "
             "walk in log space over 4x from 1.2x the cheapest measured path's p95. A miss is a measured forward time "
             "above the frame's budget; its interval is exact (Clopper-Pearson). The *controller* uses the priced rule "
             "and runs each frame under a deadline that drops up to 3 of the least important remaining blocks when "
             "the run falls behind (*rescued*); *no deadline* and *quantile rule* start from the same profile. "
             "*Top-1 on the frames* is realised (the headline); *menu top-1* is the mean of the chosen paths' top-1 "
             "on the menu images (in-sample: those images chose the menu) and on the frame images (out-of-sample). "
             "The oracle runs every path on each frame and keeps the most accurate one (by the menu images) that "
             "fitted.", ""]
    for r in results:
        lines += describe(r)
    if args.load:
        lines += ["![budget and latency per frame under load](img/simulate_load.png)"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": device_name(torch.device("cpu")), "date": str(dt.date.today()),
                                     "command": " ".join(sys.argv), "store": str(args.store),
                                     "runs": [{k: v for k, v in r.items() if k != "_res"} for r in results]},
                                    indent=1, default=float))
    body = "\n".join(lines)
    write_section("simulate", "Budget controller on a trace (DeiT-tiny, CPU)", body)
    print(body)


if __name__ == "__main__":
    main()
