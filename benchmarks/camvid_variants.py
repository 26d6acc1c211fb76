"""CamVid: two real SegFormers of different size in one menu, swept, chosen, costed and switched between.

The models differ only in size. Both start from the same first training stage (``runs/camvid-b0-s1``):
``models/segformer-b0-camvid`` continues it with a 1500-step recipe; ``models/segformer-b0-half-camvid``
is derived from it first (``dynavit derive``: MLP width 0.5 and decoder width 0.5, calibrated units kept,
compensation folded in) and then trained with the same 1500-step recipe. Both are swept into one store,
every knob of each composed.

Selection and report are kept apart as in ``camvid_segformer.py``: both calibrations use 62 train images
(every 6th index), every choice is made on ``--select-images`` other train images, and each chosen path is
evaluated once on the 101 val images, which also give the controller's trace frames.

0. ``--from-run DIR``: write the derived model that ``dynavit train`` exported to ``DIR/model`` under
   ``models/`` (fp16), its card saying how it was made (``camvid_segformer.py --from-run`` commits the B0).
1. Calibrate each model (cached under ``--out``), then sweep: a grid of resolutions on both models, then
   NSGA-II over the joint default space (the variant is the first dimension). Latency is timed round-robin.
2. Choose on the carve-out: the joint fronts by MACs and by measured latency, and the cheapest path within
   1 pt and 4 pt mIoU of the larger model's default path; evaluate each choice once on val.
3. Accelerator: the least-energy path within 1 pt and 4 pt on the modelled simba-v16 design, chosen on the
   carve-out, against the larger model's default path, with its val Δ.
4. Controller: ``--frames`` frames of a random-walk latency trace (4x range) over the val images; the menu is
   measured on the carve-out; which model each frame ran on, misses with exact intervals, realised mIoU.

Writes ``camvid-variants`` (.md, .json) under benchmarks/results/ and docs/img/camvid_variants.png:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/camvid_variants.py [--from-run runs/camvid-b0-half-clean]

The derived model's starting point (its card gives the training command that follows):

    .venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
        from camvid_segformer import calibrate; \
        calibrate(Path('runs/camvid-b0-s1/model'), Path('out/variant/calibration-s1'))"
    .venv/bin/dynavit derive runs/camvid-b0-s1/model --calibration out/variant/calibration-s1 \
        --config '{"mlp_width": 0.5, "decoder_width": 0.5}' --out out/variant/derived-s1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from camvid_segformer import calibrate, commit_model, score_on_val
from docsection import write_json, write_section
from simulate_deit import thin

from dynavit.accel.arch import Arch
from dynavit.accel.dse import explore
from dynavit.assets import assets_dir
from dynavit.runtime.simulate import frame_scorer, simulate
from dynavit.runtime.startup import start
from dynavit.runtime.traces import default_bounds, make_trace
from dynavit.sweep import ResultStore, Row, SweepTarget, pareto, run_sweep, stats
from dynavit.sweep.engine import device_name

ROOT = Path(__file__).resolve().parents[1]
BASE, SMALL = ROOT / "models" / "segformer-b0-camvid", ROOT / "models" / "segformer-b0-half-camvid"
NAME = "b0-half"
DERIVE = ("dynavit derive runs/camvid-b0-s1/model --calibration out/variant/calibration-s1 "
          "--config '{\"mlp_width\": 0.5, \"decoder_width\": 0.5}' --out out/variant/derived-s1")
DROPS = (0.01, 0.04)
RESOLUTIONS = [None, [320, 448], [288, 384], [256, 352], [224, 320]]
TASK = "segmentation"


def commit_model_half(half_run: Path) -> None:
    """The derived model's card: how it was cut, then its training run's card."""
    commit_model([half_run], SMALL, "SegFormer-B0-half for CamVid: derived from the B0's first training stage, trained",
                 {"derived by": f"`{DERIVE}` (the calibration: stage 1's, on 62 CamVid train images, every 6th "
                                "index, as `camvid_segformer.calibrate` writes it): the calibrated most important "
                                "half of every MLP and of the decoder, with the calibrated least-squares "
                                "compensation folded into the cut weights",
                  "sibling": "models/segformer-b0-camvid continues the same stage 1 with the same recipe, so the "
                             "two differ only in size",
                  "selection": "nothing was chosen on val: the structure, the recipe and the step count were fixed "
                               "before training; val was scored once at the end"})


def sweep(args: argparse.Namespace, target: SweepTarget, store: Path) -> dict[str, Any]:
    out = {}
    t = run_sweep(target, space={"resolution": RESOLUTIONS}, strategy="grid", store=store)
    out["grid: resolution on both models"] = t
    out[f"evolutionary (NSGA-II), budget {args.budget}, joint default space"] = run_sweep(
        target, space="default", strategy="evolutionary", budget=args.budget, store=store)
    return {k: {"measured": s.measured, "reused": s.reused, "seconds": s.seconds} for k, s in out.items()}


def model_of(r: Row) -> str:
    return r.config.variant or "b0"


def rec(r: Row, base: Row, val: dict[str, Row], energy: dict[str, float] | None = None) -> dict[str, Any]:
    v, v0 = val[r.key], val[base.key]
    d = stats.paired_delta(v.per_image, v0.per_image, TASK)
    out = {"model": model_of(r), "label": r.label, "config": r.config.to_dict(), "gmacs": r.macs / 1e9,
           "macs_saved": 1 - r.macs / base.macs, "latency_p50_ms": r.latency_p50_ms,
           "select_miou": r.quality, "select_delta": r.quality - base.quality,
           "val_miou": v.quality, "val_delta": d[0], "val_delta_ci": [d[1], d[2]]}
    if energy is not None:
        out["energy_uj"], out["energy_saved"] = energy[r.key], 1 - energy[r.key] / energy[base.key]
    return out


def cheapest_within(rows: list[Row], base: Row, drop: float, cost) -> Row:
    return min((r for r in rows if r.quality >= base.quality - drop - 1e-12), key=lambda r: (cost(r), -r.quality))


def accel(args: argparse.Namespace, store: Path, rows: list[Row]) -> tuple[dict[str, float], dict[float, Row], float]:
    """Energies on simba-v16 of the default, the joint MAC front and the rows it cannot rule out (up to
    ``--accel-configs``), and the least-energy one within each drop of the larger model's default."""
    t0 = time.perf_counter()
    ex = explore(store, [Arch.preset("simba-v16")], configs=[r.config for r in rows], limit=args.accel_configs,
                 cache=args.out / "zigzag-layers.db", search="fast", workers=2, drops=DROPS,
                 vector_granularity=False)
    d = ex.designs[0]
    energy = {r.key: c.energy_uj for r, c in zip(d.rows, d.costs, strict=True)}
    by_key = {r.key: r for r in rows}
    picks = {drop: by_key[d.rows[d.best_within_drop(drop)].key] for drop in DROPS}
    return energy, picks, time.perf_counter() - t0


def trace(args: argparse.Namespace, store: Path) -> dict[str, Any]:
    """The controller on val frames (menu measured on the carve-out): misses, mIoU, the model per frame."""
    s = start(store, profile_runs=50, rescue=False, frames=assets_dir() / "camvid" / "val", progress=True)
    thin(s.controller, args.max_menu)
    lo, hi = default_bounds(s.controller)
    budgets = make_trace("random-walk", args.frames, lo, hi, seed=0)
    res = simulate(s.model, s.controller, s.frames.frames(), budgets, policies=("controller", "default", "oracle"),
                   held_out_of=s.held_out_of, score=frame_scorer(s.frames))
    table = res.table()
    ctrl = res.policies["controller"]
    on_small = [c.variant == NAME for c in ctrl.executed]
    return {"frames": args.frames, "budget_range_ms": [lo, hi], "menu": [e.label for e in s.controller.entries],
            "policies": table, "controller_share_on_small": float(np.mean(on_small)),
            "budgets": budgets.tolist(), "controller_ms": ctrl.latency_ms, "controller_small": on_small,
            **s.images}


def figure(rows: list[Row], base: Row, picks: dict[str, Any], tr: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, cost, name in ((axes[0], lambda r: r.macs / 1e9, "GMACs"),
                           (axes[1], lambda r: r.latency_p50_ms, "measured p50 ms (2 threads)")):
        for m, colour in (("b0", "tab:blue"), (NAME, "tab:orange")):
            mine = [r for r in rows if model_of(r) == m]
            ax.scatter([cost(r) for r in mine], [100 * r.quality for r in mine], s=14, c=colour, alpha=0.5, label=m)
        front = sorted(pareto(rows, "macs" if "GMAC" in name else "latency_p50_ms").menu(), key=cost)
        ax.plot([cost(r) for r in front], [100 * r.quality for r in front], "k-", lw=1, label="joint front")
        ax.set_ylim(100 * min(r.quality for r in front) - 4, 100 * max(r.quality for r in rows) + 1)
        ax.set_xlabel(name)
        ax.set_ylabel("mIoU % (train carve-out)")
        ax.set_title("joint front (paths far below it are off the axis)", fontsize=9)
        ax.legend()
    b, c = np.asarray(tr["budgets"]), np.asarray(tr["controller_ms"])
    small = np.asarray(tr["controller_small"])
    axes[2].plot(b, "k-", lw=0.8, label="budget")
    axes[2].scatter(np.flatnonzero(~small), c[~small], s=3, c="tab:blue", label="ran B0")
    axes[2].scatter(np.flatnonzero(small), c[small], s=3, c="tab:orange", label=f"ran {NAME}")
    axes[2].set_xlabel("frame (val images)")
    axes[2].set_ylabel("ms")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _row(name: str, r: dict[str, Any], energy: bool = False) -> str:
    lo, hi = r["val_delta_ci"]
    cells = [name, r["model"], r["label"], f"{r['gmacs']:.2f}", f"{100 * r['macs_saved']:.1f} %",
             f"{r['latency_p50_ms']:.1f}", f"{100 * r['select_delta']:+.1f}",
             f"{100 * r['val_miou']:.1f}", f"{100 * r['val_delta']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"]
    if energy:
        cells.append(f"{100 * r['energy_saved']:.1f} %")
    return "| " + " | ".join(cells) + " |"


HEAD = ("| {} | model | path | GMACs | MACs saved | p50 ms | Δ carve-out | mIoU % val | Δ val [paired 95% CI] |{}\n"
        "|---|---|---|---|---|---|---|---|---|{}")


def section(args: argparse.Namespace, res: dict[str, Any]) -> str:
    t, c = res["trace"], {p["policy"]: p for p in res["trace"]["policies"]}
    lines = [
        f"Machine: {res['machine']}; {res['date']}; command: `OMP_NUM_THREADS={torch.get_num_threads()} "
        f".venv/bin/python benchmarks/camvid_variants.py --budget {args.budget} --frames {args.frames}`; raw output in "
        "`benchmarks/results/camvid-variants.json`.", "",
        f"Models: `models/segformer-b0-camvid` (B0, {res['gmacs']['b0']:.2f} GMACs at 352x480) and "
        f"`models/segformer-b0-half-camvid` ({NAME}, {res['gmacs'][NAME]:.2f} GMACs: half of every MLP and half "
        "the decoder). Both continue one first training stage with the same 1500-step recipe, the half model "
        "after `dynavit derive`; the cards give the commands. "
        f"Both calibrated on 62 train images; every choice made on {res['select_images']} other train images; "
        "each chosen path evaluated once on the 101 val images. Δ is against B0's default path.", "",
        "| sweep (train carve-out) | measured, reused | wall time |", "|---|---|---|",
        *[f"| {k} | {v['measured']}, {v['reused']} | {v['seconds'] / 60:.1f} min |" for k, v in res["sweeps"].items()],
        "", "Joint front by MACs, chosen on the carve-out (the models alternate on it):", "",
        HEAD.format("#", "", ""), *[_row(str(i), r) for i, r in enumerate(res["front_macs"], 1)], "",
        "Joint front by measured latency (p50 of 50 batch-1 runs per path, timed round-robin):", "",
        HEAD.format("#", "", ""), *[_row(str(i), r) for i, r in enumerate(res["front_latency"], 1)], "",
        "Cheapest path within each drop (chosen on the carve-out), by MACs and by modelled energy on simba-v16 "
        f"(int8, {res['accel_configs']} paths costed, {res['accel_seconds'] / 60:.1f} min):", "",
        HEAD.format("choice", " energy saved |", "---|"),
        *[_row(f"MACs, ≤ {k} pt", r, True) for k, r in res["at_drop_macs"].items() if "energy_saved" in r],
        *[_row(f"MACs, ≤ {k} pt", r) + " – |" for k, r in res["at_drop_macs"].items() if "energy_saved" not in r],
        *[_row(f"energy, ≤ {k} pt", r, True) for k, r in res["at_drop_energy"].items()], "",
        f"Controller: {t['frames']} frames of a random-walk trace ({t['budget_range_ms'][0]:.0f}-"
        f"{t['budget_range_ms'][1]:.0f} ms) over the 101 val images (the menu was measured on the carve-out; "
        f"overlap {t['overlap']}); menu: {' | '.join(t['menu'])}. It ran {100 * t['controller_share_on_small']:.0f} % "
        f"of the frames on {NAME}.", "",
        "| policy | misses | miss % [exact 95% CI] | realised mIoU % on the frames [95% CI] | p50 ms |",
        "|---|---|---|---|---|",
        *[f"| {p} | {c[p]['misses']} | {100 * c[p]['miss_rate']:.1f} [{100 * c[p]['miss_ci'][0]:.1f}, "
          f"{100 * c[p]['miss_ci'][1]:.1f}] | {100 * c[p]['quality']:.1f} [{100 * c[p]['quality_ci'][0]:.1f}, "
          f"{100 * c[p]['quality_ci'][1]:.1f}] | {c[p]['latency_p50_ms']:.1f} |" for p in c], "",
        "![joint fronts and the controller's trace](../../docs/img/camvid_variants.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-run", type=Path, default=None, help="training run of the derived model")
    ap.add_argument("--budget", type=int, default=16, help="NSGA-II configs over the joint space")
    ap.add_argument("--select-images", type=int, default=101)
    ap.add_argument("--frames", type=int, default=2000, help="controller trace length")
    ap.add_argument("--max-menu", type=int, default=6, help="menu paths kept for the trace (the oracle runs all)")
    ap.add_argument("--accel-configs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-variants")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_run is not None:
        commit_model_half(args.from_run)
    cal_b0, cal_small = calibrate(BASE, args.out / "calibration-b0"), calibrate(SMALL, args.out / "calibration-half")
    target = SweepTarget(model=str(BASE), data=str(assets_dir() / "camvid" / "train"), calibration=str(cal_b0),
                         limit=args.select_images, variants={NAME: str(SMALL)},
                         variant_calibrations={NAME: str(cal_small)})
    store = args.out / "joint.db"
    res: dict[str, Any] = {"machine": device_name(torch.device("cpu")), "date": str(dt.date.today()),
                           "select_images": args.select_images, "accel_configs": args.accel_configs}
    res["sweeps"] = sweep(args, target, store)
    with ResultStore(store, readonly=True) as rs:
        rows = [r for r in rs.rows() if r.strategy in ("grid", "evolutionary")]
    base = next(r for r in rows if r.config.is_default)
    res["gmacs"] = {m: min(r.macs for r in rows if model_of(r) == m and r.config.resolution is None
                           and dataclasses.replace(r.config, variant=None).is_default) / 1e9 for m in ("b0", NAME)}
    energy, e_picks, res["accel_seconds"] = accel(args, store, rows)
    fronts = {"macs": pareto(rows, "macs").menu(), "latency": pareto(rows, "latency_p50_ms").menu()}
    m_picks = {drop: cheapest_within(rows, base, drop, lambda r: r.macs) for drop in DROPS}
    val: dict[str, Row] = {}
    chosen = [base, *fronts["macs"], *fronts["latency"], *m_picks.values(), *e_picks.values()]
    res["val_seconds"] = score_on_val(target, list(dict.fromkeys(r.config for r in chosen)), val)
    en = lambda r: energy if r.key in energy else None  # noqa: E731
    res["default"] = rec(base, base, val, en(base))
    res["front_macs"] = [rec(r, base, val) for r in sorted(fronts["macs"], key=lambda r: r.macs)]
    res["front_latency"] = [rec(r, base, val) for r in sorted(fronts["latency"], key=lambda r: r.latency_p50_ms)]
    res["at_drop_macs"] = {f"{100 * d:g}": rec(r, base, val, en(r)) for d, r in m_picks.items()}
    res["at_drop_energy"] = {f"{100 * d:g}": rec(r, base, val, energy) for d, r in e_picks.items()}
    res["trace"] = trace(args, store)
    write_json("camvid-variants", res)
    figure(rows, base, res, res["trace"], ROOT / "docs" / "img" / "camvid_variants.png")
    body = section(args, res)
    write_section("camvid-variants", "Variants: two CamVid SegFormers in one menu", body)
    print(body)


if __name__ == "__main__":
    main()
