"""DeiT-tiny sweep on the ImageNet sample photographs: speed of the sweep and the accuracy-MACs menu.

1. Calibrate on 100 of the 500 images (every 5th); the sweep leaves those 100 out by content
   hash and evaluates the other 400.
2. Time ``--strategy evolutionary --budget 100`` over the default space (target: < 20 min on
   the 2-core development machine).
3. Add the greedy strategy's single-knob curves to the same store (reusing stored rows).
4. Measure prefix reuse: the greedy single-knob configs, quality only, with and without it.
5. Report: the Pareto front, the best config with >= 30 % / >= 35 % fewer MACs and its paired
   top-1 drop, and composed configs against the best single knob at matched MACs; every "best" is
   chosen on one half of the images and scored on the other.

Writes the ``sweep-deit`` section and its rows as JSON (benchmarks/results/). Run alone (other load
skews latency):

    .venv/bin/python benchmarks/sweep_deit.py [--budget 100] [--out out/bench-sweep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

from docsection import write_json, write_section

from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.data.datasets import file_sha1, list_images, read_image
from dynavit.model import load
from dynavit.sweep import ResultStore, SweepTarget, pareto, run_sweep, stats
from dynavit.sweep.engine import Evaluator, device_name
from dynavit.sweep.pareto import confirmed_best
from dynavit.sweep.space import load_space

ROOT = Path(__file__).resolve().parents[1]


def calibrate(out: Path) -> Path:
    folder = out / "calibration"
    if (folder / "calibration.json").is_file():
        return folder
    paths = list_images(assets_dir() / "imagenet-samples" / "images")[::5]
    dm = load(deit_tiny_source())
    cal = dm.calibrate([read_image(p) for p in paths])
    cal.image_hashes = [file_sha1(p) for p in paths]
    dm.save_calibration(folder)
    return folder


def write_raw(store: Path, budget: int, timings: dict | None = None) -> Path:
    """The store's rows (without per-image data) as ``benchmarks/results/sweep-deit.json``."""
    with ResultStore(store, readonly=True) as rs:
        payload = {"command": f".venv/bin/python benchmarks/sweep_deit.py --budget {budget}", "meta": rs.meta,
                   "timings": timings or {}, "rows": rs.table()}
    return write_json("sweep-deit", payload)


def single_knob(label: str) -> bool:
    return label != "default" and ";" not in label


def _confirmed_cells(c, base) -> str:
    """Cells of a row chosen on one half of the images: its quality there, then on the other half."""
    r = c.row
    return (f"{r.label} | {100 * c.selected_quality:.1f} | {100 * c.quality:.1f} [{100 * c.quality_lo:.1f}, "
            f"{100 * c.quality_hi:.1f}] | {100 * c.delta:+.1f} [{100 * c.delta_lo:+.1f}, {100 * c.delta_hi:+.1f}] | "
            f"{100 * (1 - r.macs / base.macs):.1f} % | {r.latency_p50_ms / base.latency_p50_ms:.2f}x |")


def menu_tables(rows: list, base, metric: str) -> list[str]:
    """Markdown: the MAC Pareto front, the best config at each MAC saving, the largest saving at each
    quality drop, and composed configs against the best single knob (shared by the sweep benchmarks).

    Every "best" is chosen on one half of the images and scored on the other (``confirmed_best``): the
    best of a hundred configs, chosen and scored on the same images, carries the luck that made it win.
    The task comes from the rows' own per-image statistics.
    """
    front = pareto(rows, "macs")
    n, task = len(base.per_image), stats.task_of([base.per_image])
    lines = [f"Pareto front ({metric} vs MACs, all {n} images; * = not significantly dominated, paired bootstrap):",
             "", f"| config | {metric} % | Δ pts [paired 95% CI] | GMACs | MACs saved | latency p50 ms | img/s |",
             "|---|---|---|---|---|---|---|"]
    for i in front.front:
        r = front.rows[i]
        lines.append(f"| {'*' if i in front.plausible else ''}{r.label} | {100 * r.quality:.1f} | "
                     f"{100 * r.delta:+.1f} [{100 * r.delta_lo:+.1f}, {100 * r.delta_hi:+.1f}] | "
                     f"{r.macs / 1e9:.3f} | {100 * (1 - r.macs / base.macs):.1f} % | {r.latency_p50_ms:.1f} | "
                     f"{r.images_per_s:.0f} |")
    lines += [f"Latency warning: {w}" for w in front.warnings]
    head = (f"| {{}} | config | {metric} % where chosen | {metric} % held out [95% CI] | "
            "Δ pts held out [paired 95% CI] | MACs saved | latency vs default |")
    lines += ["", f"Best config at each MAC saving: chosen (highest {metric} among configs with at least that saving) "
              f"on one half of the {n} images, scored on the other half:", "", head.format("MACs saved >="),
              "|---|---|---|---|---|---|---|"]
    for saving in (0.2, 0.3, 0.35, 0.4, 0.5):
        c = confirmed_best(rows, lambda r, s=saving: r.macs <= (1 - s) * base.macs, reference=base)
        if c is not None:
            lines.append(f"| {int(saving * 100)} % | " + _confirmed_cells(c, base))
    lines += ["", f"Largest MAC saving at each {metric} drop: chosen on one half (the cheapest config whose Δ there "
              "is at least minus the drop), scored on the other:", "", head.format("drop <="),
              "|---|---|---|---|---|---|---|"]
    pick, _ = stats.split_images(n)
    for drop in (0.005, 0.01, 0.015, 0.03):
        ok = {r.config for r in rows
              if stats.point(r.per_image[pick], task) - stats.point(base.per_image[pick], task) >= -drop}
        cheapest = min((r for r in rows if r.config in ok), key=lambda r: r.macs)
        c = confirmed_best(rows, lambda r, k=cheapest.config: r.config == k, reference=base)
        lines.append(f"| {100 * drop:g} pt | " + _confirmed_cells(c, base))
    lines += ["", "Composed configs against the best single knob at matched MACs (each the best of its kind within "
              "the MAC budget, chosen on one half of the images; Δ = composed − single, paired, on the other half):",
              "", "| MAC budget | best single knob | best composed | Δ pts held out [paired 95% CI] |",
              "|---|---|---|---|"]
    for frac in (0.9, 0.8, 0.7, 0.65, 0.6, 0.5):
        s = confirmed_best(rows, lambda r, f=frac: r.macs <= f * base.macs and single_knob(r.label))
        c = confirmed_best(rows, lambda r, f=frac: r.macs <= f * base.macs and ";" in r.label)
        if s is None or c is None:
            continue
        held = c.confirm_idx
        d, lo, hi = stats.paired_delta(c.row.per_image[held], s.row.per_image[held], task)
        lines.append(f"| {frac:.2f} x default | {s.row.label} ({100 * s.quality:.1f}) | {c.row.label} "
                     f"({100 * c.quality:.1f}) | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-sweep")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = (args.out / "calibration" / "calibration.json").is_file()
    calib = calibrate(args.out)
    t_cal = "reused from an earlier run" if cached else f"{time.perf_counter() - t0:.0f} s"
    store = args.out / "deit-tiny.db"
    for f in args.out.glob("deit-tiny.db*"):
        f.unlink()
    target = SweepTarget(model=str(deit_tiny_source()), data=str(assets_dir() / "imagenet-samples"),
                         calibration=str(calib))
    evo = run_sweep(target, space="default", strategy="evolutionary", budget=args.budget, store=store,
                    progress=True)
    greedy = run_sweep(target, space="default", strategy="greedy", budget=40, store=store, progress=True)

    # prefix reuse, measured on the greedy strategy's single-knob configs (quality pass only)
    dm, data, _, _ = target.build()
    space = load_space("default", dm.space, {k: dm.calibration.block_order(v) for k, v in
                                             (("skip_attn", "attn"), ("skip_mlp", "mlp"), ("skip_blocks", "block"))})
    from dynavit.sweep.strategies import Greedy

    cfgs = [space.config(p) for p in Greedy(space.shape, None).singles()]
    from dynavit.sweep.run import _sharing_order

    order = [cfgs[i] for i in _sharing_order(cfgs, dm)]
    from dataclasses import replace

    part = replace(data, batches=data.batches[:2], targets=data.targets[:2])  # 64 images keep this short
    timings: dict[bool, list[float]] = {}
    for reuse in (False, True, False, True):
        ev = Evaluator(dm, part, reuse_prefix=reuse, measure_latency=False, n_boot=0)
        t = time.perf_counter()
        for c, n in zip(order, [*order[1:], None], strict=True):
            ev.measure(c, next_config=n)
        timings.setdefault(reuse, []).append(time.perf_counter() - t)
        blocks_total = len(order) * 12 * len(part.batches)
        reused_share = ev.reused_blocks / blocks_total
    no_reuse, with_reuse = min(timings[False]), min(timings[True])

    with ResultStore(store, readonly=True) as rs:
        rows, meta = rs.rows(), rs.meta
    base = next(r for r in rows if r.config.is_default)
    lines = [
        f"Machine: {device_name(next(dm.module.parameters()).device)}; {dt.date.today()}; "
        f"command: `.venv/bin/python benchmarks/sweep_deit.py --budget {args.budget}`.",
        "",
        f"Calibration: 100 of the 500 images (every 5th; {t_cal}, criterion "
        f"{dm.calibration.criterion}); the sweep left them out by content hash and evaluated the other "
        f"{data.n}. Dataset fingerprint `{meta['dataset_fingerprint']}`.",
        "",
        "| sweep | configs measured | wall time | per config |",
        "|---|---|---|---|",
        f"| evolutionary (NSGA-II), budget {args.budget}, default space ({space.size} configs) | {evo.measured} | "
        f"{evo.seconds / 60:.1f} min | {evo.seconds / max(evo.measured, 1):.1f} s |",
        f"| greedy, budget 40, same store | {greedy.measured} new, {greedy.reused} reused | "
        f"{greedy.seconds / 60:.1f} min | {greedy.seconds / max(greedy.measured, 1):.1f} s |",
        "",
        "Each config: top-1/top-5 on 400 images with bootstrap CIs and a paired CI against the default, "
        f"exact MACs per operator class, batch-1 latency p50/p95 ({target.latency_repeats} runs), throughput at "
        "batch 32 (from the evaluation's own batches). Decoding happens once per sweep.",
        "",
        f"Prefix reuse on the {len(order)} single-knob configs in sharing order (quality pass on 64 images only, "
        f"best of 2): "
        f"{no_reuse:.1f} s without, {with_reuse:.1f} s with ({no_reuse / with_reuse:.2f}x); "
        f"{100 * reused_share:.0f} % of block executions reused. Results are bit-identical (tested).",
        "",
        f"Default: top-1 {100 * base.quality:.1f} % [{100 * base.quality_lo:.1f}, {100 * base.quality_hi:.1f}], "
        f"{base.macs / 1e9:.3f} GMACs, {base.latency_p50_ms:.1f} ms batch 1.",
        "",
    ]
    lines += menu_tables(rows, base, "top-1")
    body = "\n".join(lines)
    write_section("sweep-deit", "Sweep: DeiT-tiny accuracy-MACs menu (ImageNet samples)", body)
    write_raw(store, args.budget, {"evolutionary_s": evo.seconds, "evolutionary_measured": evo.measured,
                                   "greedy_s": greedy.seconds, "greedy_measured": greedy.measured,
                                   "prefix_reuse_s": {"without": no_reuse, "with": with_reuse}})
    print(body)


if __name__ == "__main__":
    main()
