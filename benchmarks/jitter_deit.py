"""How predictable is the next inference's latency? One-step errors of the controller's level (DeiT-tiny, CPU).

The controller predicts a run's latency as p50 x level x tail; the tail it must budget for is the spread
of the one-step error, observed / (p50 x level). The tighter that spread, the closer a controller can get
to an oracle that knows each frame's true latency. This benchmark runs ``--frames`` consecutive batch-1
inferences on the profiled menu, switching to a random path with probability 0.3 per frame (as a
controller does under a changing budget), and reports:

- the autocorrelation of log(observed / p50) at a few lags (do slowdowns persist?);
- the 50th, 99th and 99.5th percentiles of the one-step error for the controller's level at several
  ``level_alpha`` (fed through ``Controller.observe``), against a median of the last 3 or 9 ratios (the
  earlier level rule) and no level at all.

Writes benchmarks/results/jitter.{md,json}:

    .venv/bin/python benchmarks/jitter_deit.py [--frames 2000] [--threads 2 1]
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
from tqdm.auto import tqdm

from dynavit.runtime import Controller, Menu
from dynavit.sweep.engine import device_name

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.2, 0.5, 1.0)


def record(dm, ctrl: Controller, frames, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(menu index, ms) of ``n`` consecutive inferences, the path changing at random."""
    rng = np.random.default_rng(seed)
    idx, ms, j = np.zeros(n, int), np.zeros(n), 0
    with torch.inference_mode():
        for i in tqdm(range(n), desc="frames", leave=False, dynamic_ncols=True):
            if rng.random() < 0.3:
                j = int(rng.integers(len(ctrl.entries)))
            dm.configure(ctrl.entries[j].config)
            t0 = time.perf_counter()
            dm(frames[i % len(frames)][0])
            idx[i], ms[i] = j, (time.perf_counter() - t0) * 1e3
    return idx, ms


def quantiles(err: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.quantile(err, [0.5, 0.99, 0.995]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "out" / "bench-sweep" / "deit-tiny.db")
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()
    menu = Menu.from_store(args.store, wide=True)  # the model as the sweep measured it; candidates to profile
    dm, data = menu.model, menu.images()
    frames = data.frames()
    cmd = "`" + " ".join([".venv/bin/python benchmarks/jitter_deit.py", *sys.argv[1:]]) + "`"
    lines = [f"Machine: {device_name(torch.device('cpu'))}; {dt.date.today()}; command: {cmd}.", "",
             f"{args.frames} consecutive batch-1 inferences of DeiT-tiny on the profiled menu (the sweep's held-out "
             "photos in turn), switching to a random path with probability 0.3 per frame. *One-step error*: "
             "observed / (p50 x level) with the level from before the run, i.e. what the controller's tail must "
             "cover; the first 30 frames are left out. `level_alpha` rows feed the runs through "
             "`Controller.observe` and read its error window; the median rows are the earlier level (median of the "
             "last k ratios); *none* is observed / p50.", ""]
    raw: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        probe = Controller(menu).profile(frames[0][0], runs=30)
        idx, ms = record(dm, probe, frames, args.frames, seed=threads)
        p50 = np.array([e.latency_p50_ms for e in probe.entries])
        ratio = ms / p50[idx]
        logr = np.log(ratio)
        ac = [float(np.corrcoef(logr[:-k], logr[k:])[0, 1]) for k in (1, 2, 5, 20)]
        rows = [("none", ratio)]
        for k in (3, 9):
            med = np.array([np.median(ratio[max(0, i - k):i]) if i else 1.0 for i in range(len(ratio))])
            rows.append((f"median of last {k}", ratio / med))
        for a in ALPHAS:
            c = Controller(probe.entries, level_alpha=a, window=args.frames)
            for i, t in zip(idx, ms, strict=True):
                c.observe(probe.entries[i].config, float(t))
            rows.append((f"level_alpha {a}" + (" (default)" if a == 0.5 else ""), np.fromiter(c._c.jitter, float)))
        lines += [f"**{threads} thread{'s' if threads > 1 else ''}**: latency p50 {np.median(ms):.1f} ms over the "
                  f"mix; autocorrelation of log(observed / p50) at lag 1, 2, 5, 20: "
                  f"{', '.join(f'{v:.2f}' for v in ac)}.", "",
                  "| level | error p50 | error p99 | error p99.5 | p99 / p50 |", "|---|---|---|---|---|"]
        raw.append({"threads": threads, "p50_ms": float(np.median(ms)), "autocorrelation_lags_1_2_5_20": ac,
                    "errors": {}})
        for name, err in rows:
            q50, q99, q995 = quantiles(err[30:])
            raw[-1]["errors"][name] = {"p50": q50, "p99": q99, "p99.5": q995}
            lines.append(f"| {name} | {q50:.3f} | {q99:.3f} | {q995:.3f} | {q99 / q50:.3f} |")
        lines.append("")
    body = "\n".join(lines)
    write_section("jitter", "Latency jitter: how well the last runs predict the next (DeiT-tiny, CPU)", body)
    write_json("jitter", {"frames": args.frames, "runs": raw})
    print(body)


if __name__ == "__main__":
    main()
