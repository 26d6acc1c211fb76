"""What a deadline inside the forward costs and what its drops cost (DeiT-tiny, CPU).

1. Overhead: the default path at batch 1, with and without a deadline attached that never needs to
   drop anything (a roomy budget), interleaved run by run; the median time ratio.
2. The rescue ladder of the default path and of the controller's profiled menu (``measure_rescue``):
   top-1 on the sweep's images with the first 1, 2 and 3 droppable blocks dropped (the calibration's
   least important first), and the share of the path's time each saves.
3. What measuring the ladders takes with ``path_quality`` told the next rung (activations the rungs
   share are kept, as in a sweep) and without (each rung from the input), and that both agree.
4. Whether the ladders' savings hold: each path and its deepest rung timed at batch 1, interleaved,
   against the saving the stage shares predict. A dropped block that reduces tokens still computes
   its keys, and per-image merges make a path's time depend on the image.

Writes benchmarks/results/deadline.{md,json}:

    .venv/bin/python benchmarks/deadline_deit.py [--runs 400] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch
from docsection import write_json, write_section

from dynavit.config import ExecConfig
from dynavit.deadline import Deadline, droppable, with_dropped
from dynavit.runtime import Controller, Entry, Menu
from dynavit.runtime.run import forward
from dynavit.runtime.simulate import path_quality
from dynavit.sweep.engine import device_name

ROOT = Path(__file__).resolve().parents[1]


def measured_saving(dm, x: torch.Tensor, e: Entry, order: list[int], runs: int) -> float:
    """1 - median time of ``e``'s deepest rung / median time of ``e``, timed interleaved at batch 1."""
    plan = dm.configure(e.config).module.plan
    rung = with_dropped(e.config, droppable(plan, order)[:len(e.ladder)], plan)
    times: dict[ExecConfig, list[float]] = {e.config: [], rung: []}
    for i in range(runs + 4):
        for cfg in ((e.config, rung) if i % 2 else (rung, e.config)):
            ms = forward(dm, cfg, x).ms
            if i >= 4:  # the first rounds warm the caches after a switch of path
                times[cfg].append(ms)
    return float(1 - np.median(times[rung]) / np.median(times[e.config]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench-sweep" / "deit-tiny.db")
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    menu = Menu.from_store(args.store, wide=True)  # the model as the sweep measured it; candidates to profile
    dm, data = menu.model, menu.images()
    frames = data.frames()
    x = frames[0][0]
    quality_of = path_quality(dm, data)
    ctrl = Controller(menu).profile(x, runs=30)
    default = Controller([Entry(ExecConfig(), quality_of(ExecConfig()), latency_p95_ms=1.0, label="default")],
                         model=dm).profile(x, runs=30, front=False)
    ctrl.entries = [e for e in ctrl.entries if not e.config.is_default] + default.entries
    t0 = time.perf_counter()
    ctrl.measure_rescue(quality_of)
    hinted_s = time.perf_counter() - t0
    blind = path_quality(dm, data)  # a fresh cache; called without the hint
    check = Controller(ctrl.entries, model=dm)
    t0 = time.perf_counter()
    check.measure_rescue(lambda cfg: blind(cfg))
    blind_s = time.perf_counter() - t0
    same = [e.ladder for e in check.entries] == [e.ladder for e in ctrl.entries]
    n_rungs = sum(len(e.ladder) for e in ctrl.entries)

    impl = dm.configure(ExecConfig()).module
    shares, order = default.entries[0].shares, dm.calibration.block_order("block")
    plain, timed = [], []
    with torch.inference_mode():
        for _ in range(5):
            dm(x)
        for i in range(args.runs):
            for with_deadline in ((False, True) if i % 2 else (True, False)):
                t0 = time.perf_counter()
                impl.deadline = Deadline(1e9, shares, order, start=t0) if with_deadline else None
                dm(x)
                (timed if with_deadline else plain).append((time.perf_counter() - t0) * 1e3)
        impl.deadline = None
    ratio = float(np.median(timed) / np.median(plain))
    laddered = sorted((e for e in ctrl.entries if e.ladder), key=lambda e: e.quality)
    frame_x = [f[0] for f in frames[:8]]  # per-image merges take an image-dependent time: 8 images in turn
    measured = {e.config: float(np.median([measured_saving(dm, xi, e, order, max(4, args.runs // 40))
                                           for xi in frame_x])) for e in laddered}

    cmd = "`.venv/bin/python benchmarks/deadline_deit.py " + " ".join(sys.argv[1:]) + "`"
    lines = [f"Machine: {device_name(torch.device('cpu'))}; {dt.date.today()}; "
             f"command: {cmd}.", "",
             f"**Overhead of the checks** (default path, batch 1, {args.runs} runs each, interleaved): median "
             f"{np.median(plain):.2f} ms without a deadline, {np.median(timed):.2f} ms with one that never drops "
             f"a block: ratio {ratio:.3f}.", "",
             f"**Measuring the ladders** ({len(ctrl.entries)} paths, {n_rungs} rungs, {data.n} images, one after "
             f"the other): {hinted_s:.0f} s when each rung is told the next and the blocks they share are kept "
             f"(`path_quality(dm, data)`), {blind_s:.0f} s when each rung runs from the input: "
             f"{blind_s / hinted_s:.2f}x; the ladders are {'identical' if same else 'NOT identical'}.", "",
             f"**Rescue ladders** (top-1 on the sweep's {data.n} images; *saves*: share of the path's measured "
             "time; blocks are dropped in the calibration's order, least important first; "
             "a dropped block that reduces tokens still reduces them; the default path is added to the profiled "
             "menu; *deepest rung, measured*: the median over 8 images of the saving timed at batch 1, "
             f"{max(4, args.runs // 40)} interleaved runs of the path and the rung each):", "",
             "| path | top-1 % | 1 block dropped: top-1 %, saves | 2 blocks | 3 blocks "
             "| deepest rung: saves, measured |",
             "|---|---|---|---|---|---|"]
    for e in sorted(ctrl.entries, key=lambda e: e.quality):
        rungs = [f"{100 * q:.1f}, {100 * s:.0f} %" for s, q in e.ladder]
        rungs += ["—"] * (3 - len(rungs))
        seen = f"{100 * measured[e.config]:.0f} %" if e.config in measured else "—"
        lines.append(f"| {e.label} | {100 * e.quality:.1f} | " + " | ".join(rungs[:3]) + f" | {seen} |")
    body = "\n".join(lines + [""])
    write_section("deadline", "Deadlines in the forward: overhead and the cost of dropped blocks (DeiT-tiny, CPU)",
                  body)
    write_json("deadline", {
        "runs": args.runs, "threads": args.threads, "plain_ms": plain, "deadline_ms": timed, "ratio": ratio,
        "ladders_hinted_s": hinted_s, "ladders_blind_s": blind_s, "ladders_identical": same, "images": data.n,
        "paths": [{"label": e.label, "top1": e.quality, "ladder": [list(r) for r in e.ladder],
                   "deepest_rung_saving_measured": measured.get(e.config)}
                  for e in sorted(ctrl.entries, key=lambda e: e.quality)]})
    print(body)


if __name__ == "__main__":
    main()
