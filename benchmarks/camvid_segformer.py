"""CamVid SegFormer-B0: the committed model, its mIoU menu over execution paths, chosen on train images and
reported on val, and its paths on four modelled accelerator designs.

Whatever the benchmark selects (the MAC front, the best path at each saving or drop, composed against
single knobs, the accelerator's least-energy paths) it selects on CamVid *train* images, and reports on the
101 *val* images, each chosen path evaluated there once. The val images never take part in a choice.

0. ``--from-run DIR [DIR2]``: write the model that ``dynavit train`` exported to the last ``DIR/model`` to
   ``--model`` as fp16 safetensors (what is committed under ``models/``), each stage's card included.
1. Calibrate on 64 train images (every 6th index; 62 exist). Sweep ``--select-images`` other train images
   (spread evenly over the rest; the sweep leaves the calibration images out by content hash): NSGA-II over
   the default space, then the greedy strategy's single-knob curves into the same store. Reruns resume it.
2. Choose on the train carve-out: the MAC front, the best path at each MAC saving, the cheapest path at
   each mIoU drop, the best composed and the best single-knob path at each MAC budget.
3. Accelerator: the store's paths on simba-v{8,16,32,64} (1024 MACs/cycle each, channel knobs rounded to
   V): the least-energy path within 1.5 pt and 4 pt mIoU of the default, chosen on the carve-out.
4. Evaluate every chosen path, and the default, on the val images: mIoU with a bootstrap CI (images
   resampled) and the paired Δ against the default on val.

The model was trained on the train split, so the carve-out's mIoU says how paths rank, not how well the
model segments; val scored it once, after both training stages.
Writes ``sweep-camvid`` (.md, .json) and ``accel-camvid`` (benchmarks/results/). Run alone:

    .venv/bin/python benchmarks/camvid_segformer.py [--from-run runs/camvid-b0-s1 runs/camvid-b0-clean]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from docsection import write_json, write_section
from sweep_deit import single_knob

import dynavit
from dynavit.accel.arch import Arch
from dynavit.accel.dse import Exploration, design_points, explore
from dynavit.accel.dse_report import markdown_table, write_exploration
from dynavit.assets import assets_dir
from dynavit.config import ExecConfig
from dynavit.data import open_dataset
from dynavit.data.datasets import file_sha1
from dynavit.sweep import ResultStore, Row, SweepTarget, pareto, run_sweep, stats
from dynavit.sweep.engine import device_name
from dynavit.sweep.pareto import best_within
from dynavit.sweep.row import config_key
from dynavit.train.supervised import export

ROOT = Path(__file__).resolve().parents[1]
SAVINGS = (0.2, 0.3, 0.35, 0.4, 0.5)  # best path with at least this share of the MACs saved
DROPS = (0.005, 0.01, 0.015, 0.03)  # cheapest path within this mIoU drop
BUDGETS = (0.9, 0.8, 0.7, 0.65, 0.6, 0.5)  # composed vs single knob within this share of the MACs
TASK = "segmentation"


B0_CARD = {
    "why two stages": "median-frequency class weights (stage 1) leave frequent classes under-predicted on the "
                      "training images themselves (after stage 1: Building IoU 0.60 and pixel accuracy 0.81 on 60 "
                      "train images), so stage 2 continues with plain cross-entropy",
    "selection": "both recipes and step counts were fixed before this model was trained; no checkpoint, recipe or "
                 "step count was chosen on val, which scored the model once, after stage 2",
}


def commit_model(runs: list[Path], dst: Path, name: str = "SegFormer-B0 trained from scratch on CamVid train by "
                 "dynavit", extra: dict[str, str] | None = None) -> None:
    """fp16 copy of the last run's exported model; the card: ``extra``, then every stage (each run's card)."""
    lm = dynavit.load(runs[-1] / "model")
    card: dict[str, str] = {"name": name, **(extra or {})}
    for i, run in enumerate(runs, 1):
        stage = dict(re.findall(r"^- \*\*(.+?)\*\*: (.*)$", (run / "model" / "README.md").read_text(), re.M))
        prefix = f"stage {i} " if len(runs) > 1 else ""
        card.update({f"{prefix}{k}": v for k, v in stage.items()})
    card["weights"] = "fp16 safetensors (dynavit.load returns fp32); the commands above reproduce them"
    if dst.exists():
        shutil.rmtree(dst)
    export(lm, dst, card, half=True)


def calibrate(model: Path, folder: Path) -> Path:
    """``model`` calibrated on 62 CamVid train images (every 6th index) into ``folder`` (reused when there)."""
    if (folder / "calibration.json").is_file():
        return folder
    train = open_dataset(assets_dir() / "camvid" / "train")
    idx = list(range(0, len(train), 6))[:64]
    dm = dynavit.load(model)
    cal = dm.calibrate([train.load(i)[0] for i in idx])
    cal.image_hashes = [file_sha1(train.path(i)) for i in idx]
    dm.save_calibration(folder)
    return folder


# ------------------------------------------------------------------------------------ choosing


@dataclass
class Choices:
    """What the train carve-out chose; ``val`` (config key -> row on val) is filled afterwards."""

    front: list[Row]
    at_saving: dict[float, Row]
    at_drop: dict[float, Row]
    composed: dict[float, tuple[Row, Row]]  # MAC budget -> (best single knob, best composed)
    accel: dict[str, dict[float, Row]] = field(default_factory=dict)  # design -> drop -> least-energy path
    val: dict[str, Row] = field(default_factory=dict)

    def configs(self, base: Row) -> list[ExecConfig]:
        """Every chosen config once, the default first."""
        rows = [base, *self.front, *self.at_saving.values(), *self.at_drop.values(),
                *(r for pair in self.composed.values() for r in pair),
                *(r for picks in self.accel.values() for r in picks.values())]
        return list(dict.fromkeys(r.config for r in rows))


def choose(rows: Sequence[Row], base: Row) -> Choices:
    """The menu's choices, all on the carve-out's images (point estimates, as a deployment would choose)."""
    at_drop = {d: min((r for r in rows if r.quality >= base.quality - d - 1e-12), key=lambda r: (r.macs, -r.quality))
               for d in DROPS}
    composed = {}
    for f in BUDGETS:
        s = best_within([r for r in rows if single_knob(r.label)], "macs", f * base.macs)
        c = best_within([r for r in rows if ";" in r.label], "macs", f * base.macs)
        if s is not None and c is not None:
            composed[f] = (s, c)
    at_saving = {s: r for s in SAVINGS if (r := best_within(rows, "macs", (1 - s) * base.macs)) is not None}
    return Choices(pareto(rows, "macs").menu(), at_saving, at_drop, composed)


def accel_choices(ex: Exploration) -> dict[str, dict[float, Row]]:
    """Each design's least-energy path within each drop, as the exploration chose it (on the carve-out)."""
    return {d.arch.name: {drop: d.rows[d.best_within_drop(drop)] for drop in ex.drops} for d in ex.designs}


def score_on_val(select: SweepTarget, cfgs: Sequence[ExecConfig], done: dict[str, Row]) -> float:
    """Evaluate each config not in ``done`` once on the val images (quality and MACs, no timing), into ``done``,
    with the models and calibrations of ``select`` (the target that chose them). Returns the seconds it took."""
    todo = [c for c in cfgs if config_key(c) not in done]
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    target = dataclasses.replace(select, data=str(assets_dir() / "camvid" / "val"), limit=None,
                                 measure_latency=False)
    _, _, ev, _ = target.build(progress=True)
    for c, nxt in zip(todo, [*todo[1:], None], strict=True):
        row = ev.measure(c, next_config=nxt)
        done[row.key] = row
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ reporting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _delta(a: Row, b: Row) -> tuple[float, float, float]:
    return stats.paired_delta(a.per_image, b.per_image, TASK)


def _fmt_delta(d: tuple[float, float, float]) -> str:
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def record(r: Row, base: Row, ch: Choices) -> dict[str, Any]:
    """One chosen path: where it was chosen (train carve-out) and its val report."""
    v, v0 = ch.val[r.key], ch.val[base.key]
    d = _delta(v, v0)
    return {"config": r.config.to_dict(), "label": r.label, "macs": r.macs, "macs_saved": 1 - r.macs / base.macs,
            "latency_p50_ms": r.latency_p50_ms, "latency_p95_ms": r.latency_p95_ms,
            "select_miou": r.quality, "select_delta": r.delta,
            "val_miou": v.quality, "val_miou_ci": [v.quality_lo, v.quality_hi],
            "val_delta": d[0], "val_delta_ci": [d[1], d[2]]}


def _cells(r: Row, base: Row, ch: Choices) -> str:
    v = ch.val[r.key]
    return (f"{r.label} | {_pct(r.quality)} | {100 * (r.delta or 0):+.1f} | {_pct(v.quality)} "
            f"[{_pct(v.quality_lo)}, {_pct(v.quality_hi)}] | {_fmt_delta(_delta(v, ch.val[base.key]))} | "
            f"{100 * (1 - r.macs / base.macs):.1f} % |")


HEAD = "| {} | config | mIoU % train (chose) | Δ train | mIoU % val [95% CI] | Δ val [paired 95% CI] | MACs saved |"


def menu_tables(base: Row, ch: Choices, n_select: int) -> list[str]:
    """Markdown: every choice with its carve-out numbers (where it was chosen) and its val numbers."""
    rule = "|---|---|---|---|---|---|---|"
    lines = [f"MAC front chosen on the {n_select} train images, each path then evaluated once on the 101 val images:",
             "", HEAD.format("#"), rule]
    lines += [f"| {i} | " + _cells(r, base, ch) for i, r in enumerate(ch.front, 1)]
    lines += ["", "Best path at each MAC saving (highest train mIoU among paths with at least that saving):", "",
              HEAD.format("MACs saved >="), rule]
    lines += [f"| {int(100 * s)} % | " + _cells(r, base, ch) for s, r in ch.at_saving.items()]
    lines += ["", "Largest MAC saving at each mIoU drop (the cheapest path whose train Δ is at least minus the drop):",
              "", HEAD.format("drop <="), rule]
    lines += [f"| {100 * d:g} pt | " + _cells(r, base, ch) for d, r in ch.at_drop.items()]
    lines += ["", "Composed paths against the best single knob within each MAC budget (both chosen on train; "
              "Δ = composed − single, paired):", "",
              "| MAC budget | best single knob (train mIoU) | best composed (train mIoU) | Δ train "
              "| Δ val [paired 95% CI] |",
              "|---|---|---|---|---|"]
    for f, (s, c) in ch.composed.items():
        lines.append(f"| {f:.2f} x default | {s.label} ({_pct(s.quality)}) | {c.label} ({_pct(c.quality)}) | "
                     f"{100 * (c.quality - s.quality):+.1f} | {_fmt_delta(_delta(ch.val[c.key], ch.val[s.key]))} |")
    return lines


def accel_val_table(ex: Exploration, base: Row, ch: Choices) -> str:
    """The exploration's choices (made on the carve-out) with their val Δ mIoU."""
    lines = ["| design | drop <= | path (chosen on train) | energy saved | Δ train | Δ val [paired 95% CI] |",
             "|---|---|---|---|---|---|"]
    for s in ex.summaries():
        for drop, r in ch.accel[s["design"]].items():
            a = s["at_drop"][f"{100 * drop:g}"]
            lines.append(f"| {s['design']} | {100 * drop:g} pt | {r.label} | {100 * a['energy_saving']:.1f} % | "
                         f"{-a['drop_pts']:+.1f} | {_fmt_delta(_delta(ch.val[r.key], ch.val[base.key]))} |")
    return "\n".join(lines) + "\n"


def sweep_section(args: argparse.Namespace, sweeps: dict[str, Any], rows: Sequence[Row], ch: Choices,
                  timings: dict[str, float | None]) -> str:
    base = next(r for r in rows if r.config.is_default)
    n_select = len(base.per_image)
    v0 = ch.val[base.key]
    cal = "reused from an earlier run" if timings["calibration"] is None else f"{timings['calibration']:.0f} s"
    lines = [
        f"Machine: {device_name(torch.device('cpu'))}; {dt.date.today()}; command: "
        f"`.venv/bin/python benchmarks/camvid_segformer.py --budget {args.budget} --greedy-budget "
        f"{args.greedy_budget} --select-images {args.select_images} --latency-repeats {args.latency_repeats}`.",
        "",
        f"Model: `models/segformer-b0-camvid` (SegFormer-B0 trained by dynavit on CamVid train; its card says how; "
        f"both training stages were fixed before training, and val scored the model once, after them). "
        f"Calibration: 62 train images (every 6th; {cal}). Selection: {n_select} other "
        "train images (spread evenly over the rest; disjoint from the calibration by content hash). Report: the "
        "101 val images, each chosen path evaluated there once "
        f"({len(ch.val)} paths, {timings['val'] / 60:.1f} min). 352x480, void ignored, mIoU over 11 classes with "
        "bootstrap CIs (images resampled) and paired CIs against the default path on the same images.",
        "",
        "| sweep (on the train carve-out) | this run: measured, reused, wall time | rows in the store | their "
        "measuring time (sum) |",
        "|---|---|---|---|",
    ]
    for (name, s), strategy in zip(sweeps.items(), ("evolutionary", "greedy"), strict=False):
        mine = [r for r in rows if r.strategy == strategy]
        lines.append(f"| {name} | {s.measured}, {s.reused}, {s.seconds / 60:.1f} min | {len(mine)} | "
                     f"{sum(r.seconds for r in mine) / 60:.1f} min |")
    lines += [
        "",
        f"Default path: mIoU {_pct(base.quality)} % on the train carve-out (the model was trained on these images), "
        f"{_pct(v0.quality)} % [{_pct(v0.quality_lo)}, {_pct(v0.quality_hi)}] on val; {base.macs / 1e9:.3f} GMACs. "
        f"CPU latencies (p50 of {args.latency_repeats} batch-1 runs per path, in the JSON) are left out of these "
        "tables: they were taken on a shared machine under changing load, at different times for different paths, "
        "and rank nothing; the accelerator section gives modelled latencies.",
        "",
        *menu_tables(base, ch, n_select),
    ]
    return "\n".join(lines)


def payload(args: argparse.Namespace, sweeps: dict[str, Any], base: Row, ch: Choices, n_select: int,
            timings: dict[str, float | None]) -> dict[str, Any]:
    rec = lambda r: record(r, base, ch)  # noqa: E731
    return {
        "protocol": {"calibration": "62 CamVid train images (every 6th index)",
                     "select": f"{n_select} other CamVid train images, spread evenly", "report": "101 CamVid val",
                     "latency_repeats": args.latency_repeats},
        "sweeps": {k: {"measured": s.measured, "reused": s.reused, "seconds": s.seconds} for k, s in sweeps.items()},
        "timings_s": timings,
        "default": rec(base),
        "front": [rec(r) for r in ch.front],
        "at_saving": {f"{100 * s:g}": rec(r) for s, r in ch.at_saving.items()},
        "at_drop_pts": {f"{100 * d:g}": rec(r) for d, r in ch.at_drop.items()},
        "composed_vs_single": {f"{f:g}": {"single": rec(s), "composed": rec(c),
                                          "val_delta": _delta(ch.val[c.key], ch.val[s.key])}
                               for f, (s, c) in ch.composed.items()},
        "accel": {d: {f"{100 * drop:g}": rec(r) for drop, r in picks.items()} for d, picks in ch.accel.items()},
    }


def accel_section(args: argparse.Namespace, ex: Exploration, base: Row, ch: Choices, secs: float) -> str:
    return (
        f"Date: {dt.date.today()}. Command: `.venv/bin/python benchmarks/camvid_segformer.py` (as in sweep-camvid). "
        "Modelled energies (ZigZag for conv/GEMM, dynavit's vector-unit model for the rest; `accel/energy.py` gives "
        f"every source), per 352x480 frame at batch 1, int8. {len(ex.designs)} designs x {args.accel_configs} "
        "stored paths (the MAC front and the paths it cannot rule out first), channel knobs rounded to V and "
        f"re-measured on the train carve-out: {secs / 60:.1f} min, {ex.zigzag_searches} ZigZag searches (layers "
        "already costed by an earlier run of this benchmark are read from its layer cache).\n\n"
        "Savings are against each design's own default path; the least-energy path within each mIoU drop, chosen on "
        "the train carve-out, with its Δ mIoU there:\n\n" + markdown_table(ex)
        + "\nThe same paths evaluated once on the 101 val images (Δ against the default path on val):\n\n"
        + accel_val_table(ex, base, ch)
        + "\n![energy-mIoU fronts per vector size](../../docs/img/accel_camvid_fronts.png)\n"
    )


def run_accel(args: argparse.Namespace, store: Path, configs: list[ExecConfig]) -> tuple[Exploration, float]:
    """The designs on the sweeps' paths (``configs``; the rounded paths a run adds are the designs' own)."""
    archs = design_points(Arch.preset("simba-v16"), [8, 16, 32, 64])
    t0 = time.perf_counter()
    # ZigZag's layer costs depend on the design and the layer shape only: kept across reruns and stores
    # the store's train images choose (all of them), val reports: no split inside the store
    ex = explore(store, archs, configs=configs, limit=args.accel_configs, cache=args.out / "zigzag-layers.db",
                 search="fast", workers=2, select_share=None)
    secs = time.perf_counter() - t0
    write_exploration(ex, args.out / "accel")
    shutil.copy(args.out / "accel" / "dse_fronts.png", ROOT / "docs" / "img" / "accel_camvid_fronts.png")
    return ex, secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "segformer-b0-camvid")
    ap.add_argument("--from-run", type=Path, nargs="+", default=None, help="training run folder(s), in order")
    ap.add_argument("--budget", type=int, default=16, help="NSGA-II configs")
    ap.add_argument("--greedy-budget", type=int, default=8, help="greedy configs (stored rows are reused); 0: none")
    ap.add_argument("--select-images", type=int, default=101, help="train images that choose (not calibration's)")
    ap.add_argument("--latency-repeats", type=int, default=20, help="batch-1 timings per path (kept in the JSON)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-camvid")
    ap.add_argument("--accel-configs", type=int, default=8, help="paths costed per design (front first)")
    ap.add_argument("--no-accel", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_run is not None:
        commit_model(args.from_run, args.model, extra=B0_CARD)
    t0, cached = time.perf_counter(), (args.out / "calibration" / "calibration.json").is_file()
    calib = calibrate(args.model, args.out / "calibration")
    timings = {"calibration": None if cached else time.perf_counter() - t0}  # None: an earlier run's
    store = args.out / f"segformer-b0-train{args.select_images}.db"
    target = SweepTarget(model=str(args.model), data=str(assets_dir() / "camvid" / "train"), calibration=str(calib),
                         limit=args.select_images, latency_repeats=args.latency_repeats)
    sweeps = {f"evolutionary (NSGA-II), budget {args.budget}, default space":
              run_sweep(target, space="default", strategy="evolutionary", budget=args.budget, store=store)}
    if args.greedy_budget:
        sweeps[f"greedy, budget {args.greedy_budget}, same store"] = run_sweep(
            target, space="default", strategy="greedy", budget=args.greedy_budget, store=store)
    with ResultStore(store, readonly=True) as rs:  # the sweeps' rows: not the accelerator's rounded paths
        rows = [r for r in rs.rows() if r.strategy in ("evolutionary", "greedy")]
    base = next(r for r in rows if r.config.is_default)
    n_select = len(base.per_image)
    ch = choose(rows, base)
    timings["val"] = score_on_val(target, ch.configs(base), ch.val)
    body = sweep_section(args, sweeps, rows, ch, timings)
    write_section("sweep-camvid", "Sweep: CamVid SegFormer-B0 mIoU-MACs menu (chosen on train, reported on val)",
                  body)
    write_json("sweep-camvid", payload(args, sweeps, base, ch, n_select, timings))
    print(body)
    if args.no_accel:
        return
    ex, timings["accel"] = run_accel(args, store, [r.config for r in rows])
    ch.accel = accel_choices(ex)
    timings["accel_val"] = score_on_val(target, ch.configs(base), ch.val)
    write_json("sweep-camvid", payload(args, sweeps, base, ch, n_select, timings))  # now with the accel choices
    body = accel_section(args, ex, base, ch, timings["accel"])
    write_section("accel-camvid", "Accelerator: CamVid SegFormer-B0 paths on four designs (modelled)", body)
    print(body)


if __name__ == "__main__":
    main()
