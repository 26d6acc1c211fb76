"""CamVid SegFormer-B0: the committed model, its mIoU menu over execution paths and its
paths on four modelled accelerator designs.

0. ``--from-run DIR [DIR2]``: write the model that ``dynavit train`` exported to the last ``DIR/model`` to
   ``--model`` as fp16 safetensors (what is committed under ``models/``), each stage's card included.
1. Calibrate on 64 CamVid *train* images (every 6th); sweep the 101 *val* images: NSGA-II over the
   default space (resolution, MLP width, attention/MLP skips, decoder width and branches), then the
   greedy strategy's single-knob curves into the same store. Reruns resume the store.
2. Tables (shared with the DeiT sweep): the MAC front, the best config at each MAC saving, the
   largest saving at each mIoU drop, composed configs against the best single knob.
3. Accelerator: the store's paths on simba-v{8,16,32,64} (1024 MACs/cycle each, channel knobs
   rounded to V): energy and latency saved at <= 1.5 pt and <= 4 pt mIoU drop.

Writes the ``sweep-camvid`` and ``accel-camvid`` sections (benchmarks/results/). Run alone:

    .venv/bin/python benchmarks/camvid_segformer.py [--from-run runs/camvid-b0] [--budget 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import time
from pathlib import Path

import torch
from docsection import write_section
from sweep_deit import menu_tables

import dynavit
from dynavit.accel.arch import Arch
from dynavit.accel.dse import design_points, explore, markdown_table, write_exploration
from dynavit.assets import assets_dir
from dynavit.data import open_dataset
from dynavit.data.datasets import file_sha1
from dynavit.sweep import ResultStore, SweepTarget, run_sweep
from dynavit.sweep.engine import device_name
from dynavit.train.supervised import export

ROOT = Path(__file__).resolve().parents[1]


def commit_model(runs: list[Path], dst: Path) -> None:
    """fp16 copy of the last run's exported model; the card lists every stage (each run's card)."""
    lm = dynavit.load(runs[-1] / "model")
    card: dict[str, str] = {"name": "SegFormer-B0 trained from scratch on CamVid train by dynavit"}
    for i, run in enumerate(runs, 1):
        stage = dict(re.findall(r"^- \*\*(.+?)\*\*: (.*)$", (run / "model" / "README.md").read_text(), re.M))
        prefix = f"stage {i} " if len(runs) > 1 else ""
        card.update({f"{prefix}{k}": v for k, v in stage.items()})
    card["weights"] = "fp16 safetensors (dynavit.load returns fp32); the commands above reproduce them"
    if dst.exists():
        shutil.rmtree(dst)
    export(lm, dst, card, half=True)


def calibrate(model: Path, out: Path) -> Path:
    folder = out / "calibration"
    if (folder / "calibration.json").is_file():
        return folder
    train = open_dataset(assets_dir() / "camvid" / "train")
    idx = list(range(0, len(train), 6))[:64]
    dm = dynavit.load(model)
    cal = dm.calibrate([train.load(i)[0] for i in idx])
    cal.image_hashes = [file_sha1(train.path(i)) for i in idx]
    dm.save_calibration(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "segformer-b0-camvid")
    ap.add_argument("--from-run", type=Path, nargs="+", default=None, help="training run folder(s), in order")
    ap.add_argument("--budget", type=int, default=40, help="NSGA-II configs")
    ap.add_argument("--greedy-budget", type=int, default=30, help="greedy configs (stored rows are reused)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-camvid")
    ap.add_argument("--accel-configs", type=int, default=30, help="paths costed per design (front first)")
    ap.add_argument("--no-accel", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_run is not None:
        commit_model(args.from_run, args.model)
    t0 = time.perf_counter()
    calib = calibrate(args.model, args.out)
    t_cal = time.perf_counter() - t0
    store = args.out / "segformer-b0.db"
    target = SweepTarget(model=str(args.model), data=str(assets_dir() / "camvid" / "val"), calibration=str(calib))
    evo = run_sweep(target, space="default", strategy="evolutionary", budget=args.budget, store=store, progress=True)
    greedy = run_sweep(target, space="default", strategy="greedy", budget=args.greedy_budget, store=store,
                       progress=True)
    with ResultStore(store, readonly=True) as rs:
        rows = rs.rows()
    base = next(r for r in rows if r.config.is_default)
    rel = args.model.resolve().relative_to(ROOT) if args.model.resolve().is_relative_to(ROOT) else args.model
    lines = [
        f"Machine: {device_name(torch.device('cpu'))}; {dt.date.today()}; "
        f"command: `.venv/bin/python benchmarks/camvid_segformer.py --budget {args.budget} "
        f"--greedy-budget {args.greedy_budget}`.",
        "",
        f"Model: `{rel}` (SegFormer-B0 trained by dynavit on CamVid train; its card says how). Calibration: 64 "
        f"CamVid train images ({t_cal:.0f} s); evaluation: the 101 val images at 352x480, void ignored, mIoU over "
        f"11 classes with bootstrap CIs (images resampled) and paired CIs against the default.",
        "",
        "| sweep | configs measured | wall time | per config |",
        "|---|---|---|---|",
        f"| evolutionary (NSGA-II), budget {args.budget}, default space | {evo.measured} new, {evo.reused} reused | "
        f"{evo.seconds / 60:.1f} min | {evo.seconds / max(evo.measured, 1):.1f} s |",
        f"| greedy, budget {args.greedy_budget}, same store | {greedy.measured} new, {greedy.reused} reused | "
        f"{greedy.seconds / 60:.1f} min | {greedy.seconds / max(greedy.measured, 1):.1f} s |",
        "",
        f"Default: mIoU {100 * base.quality:.1f} % [{100 * base.quality_lo:.1f}, {100 * base.quality_hi:.1f}], "
        f"{base.macs / 1e9:.3f} GMACs, {base.latency_p50_ms:.1f} ms batch 1.",
        "",
        *menu_tables(rows, base, "mIoU"),  # the task comes from the rows
    ]
    body = "\n".join(lines)
    write_section("sweep-camvid", "Sweep: CamVid SegFormer-B0 mIoU-MACs menu (val split)", body)
    print(body)
    if args.no_accel:
        return
    archs = design_points(Arch.preset("simba-v16"), [8, 16, 32, 64])
    t0 = time.perf_counter()
    ex = explore(store, archs, limit=args.accel_configs, search="fast", workers=2)
    secs = time.perf_counter() - t0
    write_exploration(ex, args.out / "accel")
    shutil.copy(args.out / "accel" / "dse_fronts.png", ROOT / "docs" / "img" / "accel_camvid_fronts.png")
    body = (
        f"Date: {dt.date.today()}. Command: `.venv/bin/python benchmarks/camvid_segformer.py` (as above). "
        "Modelled energies "
        "(ZigZag for conv/GEMM, dynavit's vector-unit model for the rest; `accel/energy.py` gives every source), per "
        f"352x480 frame at batch 1, int8. {len(archs)} designs x {args.accel_configs} stored paths (the MAC front and "
        "the paths it cannot rule out first), channel knobs rounded "
        f"to V and re-measured on the val images: {secs / 60:.1f} min, {ex.zigzag_searches} ZigZag searches.\n\n"
        "Savings are against each design's own default path; the least-energy path within each mIoU drop, with its "
        "measured Δ mIoU against the default (val images):\n\n" + markdown_table(ex)
        + "\n![energy-mIoU fronts per vector size](img/accel_camvid_fronts.png)\n"
    )
    write_section("accel-camvid", "Accelerator: CamVid SegFormer-B0 paths on four designs (modelled)", body)
    print(body)


if __name__ == "__main__":
    main()
