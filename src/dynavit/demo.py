"""``make demo``: the end-to-end tour, written to ``out/``.

1. Profile DeiT-tiny (real weights) at 224x224: where the FLOPs and the time go.
2. Profile a SegFormer-B2 configuration at 512x512 (the dynamic-inference study's model).
3. Evaluate DeiT-tiny on the ImageNet sample photographs with the DeiT protocol.
4. Calibrate DeiT-tiny on every 5th photograph, sweep execution paths on the others (greedy,
   small space), print the Pareto front and write the HTML report to ``out/report``.
5. A short trace: real inferences against per-frame latency budgets, the budget controller
   next to the baselines (always full, always smallest, best static, oracle). The menu is
   measured on half of the sweep's images and the frames come from the other half.

Offline it uses ``../shared/assets`` (or ``$DYNAVIT_ASSETS``); on an online machine without
them, DeiT-tiny comes from the hub (``facebook/deit-tiny-patch16-224``) and step 3 runs
only when ``--data`` (or the assets) provide labelled images.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from rich.console import Console

from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.cost import profile
from dynavit.data import open_dataset
from dynavit.data.datasets import file_sha1, list_images, read_image
from dynavit.evaluation import evaluate
from dynavit.model import load
from dynavit.report import write_report
from dynavit.runtime.simulate import hindsight_bounds, simulate
from dynavit.runtime.startup import start
from dynavit.runtime.traces import make_trace
from dynavit.sweep import SweepTarget, pareto, run_sweep


def _save_profile(p, out: Path, stem: str, console: Console) -> dict:
    rec = Console(record=True, width=110, file=io.StringIO())
    rec.print(p.table())
    rec.print(p.module_table(max_depth=2, top=15))
    (out / f"{stem}_profile.txt").write_text(rec.export_text())
    p.save_json(out / f"{stem}_profile.json")
    p.plot(out / f"{stem}_flops_vs_time.png")
    console.print(p.table())
    return {
        "model": p.model, "input": list(p.input_shape), "gmacs": round(p.total_macs / 1e9, 4),
        "latency_ms_p50": round(p.latency_ms, 2),
        "classes": {k: {"mac_share": round(c.share, 4), "flop_share": round(c.flop_share, 4),
                        "time_share": round(c.time_share, 4)}
                    for k, c in p.classes.items() if c.flops or c.time_ms},
    }


def _sweep(deit, data: Path, out: Path, limit: int | None, console: Console) -> dict:
    """Calibrate on every 5th image, sweep the rest, report (a few minutes on 2 cores)."""
    console.rule("4/5 calibrate, sweep execution paths, report")
    calib = out / "calibration"
    images = list_images(data, recursive=True)[::5][:100]
    if not (calib / "calibration.json").is_file():
        fresh = load(deit.source)  # calibration reorders weights: keep the evaluated model as it was
        cal = fresh.calibrate([read_image(p) for p in images])
        cal.image_hashes = [file_sha1(p) for p in images]
        fresh.save_calibration(calib)
    target = SweepTarget(model=str(deit.source), data=str(data), calibration=str(calib),
                         limit=min(limit or 200, 200), latency_repeats=50)
    s = run_sweep(target, space="small", strategy="greedy", budget=12, store=out / "sweep.db")
    front = pareto(s.rows, "macs")
    for w in front.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    base = next(r for r in s.rows if r.config.is_default)
    console.print(f"{s.total} configs on {s.n_images} images (calibration images left out: "
                  f"{s.excluded_calibration_images}); Pareto front by MACs:")
    for r in front.menu():
        console.print(f"  {100 * r.quality:5.1f} % top-1 ({100 * r.delta:+.1f} pts, paired CI "
                      f"{100 * r.delta_lo:+.1f}..{100 * r.delta_hi:+.1f})  {r.macs / 1e9:.3f} GMACs "
                      f"({100 * (1 - r.macs / base.macs):4.1f} % fewer)  {r.latency_p50_ms:.1f} ms  {r.label}")
    report = write_report(out / "sweep.db", out / "report")
    console.print(f"report: {report}  (menu: dynavit pareto {out / 'sweep.db'})")
    trace = _trace(out / "sweep.db", console)
    return {"trace": trace, "store": str(out / "sweep.db"), "report": str(report), "configs": s.total,
            "front": [{"config": r.label, "top1": r.quality, "gmacs": r.macs / 1e9} for r in front.menu()]}


def _trace(store: Path, console: Console, frames: int = 120) -> list[dict]:
    console.rule("5/5 budget controller on a trace of latency budgets")
    # the model as the sweep measured it, its menu re-measured here, what dropping blocks costs each path;
    # the menu's qualities and ladders on half of the sweep's images, the frames from the other half
    s = start(store, profile_runs=50, images=True, progress=True)
    ctrl = s.controller
    # a sine over 4x from just above the cheapest path's median: a quarter of the frames leave no room
    # for the full model, so the policies differ (``default_bounds``, from the cheapest p95, is roomier)
    lo = 1.05 * min(e.latency_p50_ms or e.latency_p95_ms for e in ctrl.entries)
    hi = 4 * lo
    budgets = make_trace("sine", frames, lo, hi)
    res = simulate(s.model, ctrl, s.frames.frames(), budgets, quality_of=s.quality_of, held_out_of=s.held_out_of,
                   interleave=True)  # side by side: a fair race
    console.print(f"{frames} frames from {len(s.images['frame_images'])} images that did not measure the menu "
                  f"({len(s.images['menu_images'])} did; overlap {s.images['overlap']}), budgets {lo:.1f}-{hi:.1f} "
                  f"ms, {len(ctrl.entries)} paths on the menu; the policies take turns on each frame")
    for r in res.table():
        lo_m, hi_m = r["miss_ci"]
        console.print(f"  {r['policy']:12s} misses {r['misses']:4d} ({100 * r['miss_rate']:4.1f} %, 95 % CI "
                      f"{100 * lo_m:.1f}-{100 * hi_m:.1f})  top-1 on the frames {100 * r['quality']:5.1f} %  "
                      f"(menu images {100 * r['menu_quality']:5.1f} %, "
                      f"frame images {100 * r['held_out_quality']:5.1f} %)"
                      f"  p50 {r['latency_p50_ms']:6.1f} ms  rescued {r['rescued']:3d}")
    for name, b in hindsight_bounds(res, ctrl.entries).items():  # how close any controller could get
        console.print(f"  bound, {name}: misses {100 * b['miss_rate']:.1f} %, "
                      f"menu top-1 {100 * b['menu_quality']:.1f} % "
                      "(menu images)")
    return res.table()


def _written_since(out: Path, t0: float) -> list[str]:
    """Top-level entries of ``out`` that this run wrote (benchmarks and other runs also write to ``out``)."""
    def fresh(p: Path) -> bool:
        return p.stat().st_mtime >= t0 or (p.is_dir() and any(q.stat().st_mtime >= t0 for q in p.rglob("*")))

    return sorted(p.name for p in out.iterdir() if not p.name.endswith(("-wal", "-shm")) and fresh(p))  # SQLite's


def run_demo(out: Path, *, limit: int | None = None, console: Console | None = None,
             data: Path | None = None) -> dict:
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    started = time.time()

    src = deit_tiny_source()
    console.rule(f"1/5 profile DeiT-tiny ({src})")
    deit = load(src)
    summary["deit_tiny"] = _save_profile(profile(deit), out, "deit_tiny", console)

    console.rule("2/5 profile SegFormer-B2 configuration at 512x512 (ADE20K head, 150 classes)")
    seg = load("config:segformer-b2")
    summary["segformer_b2"] = _save_profile(profile(seg, input_size=(512, 512), repeats=3), out,
                                            "segformer_b2", console)

    root = assets_dir()
    data = data or (root / "imagenet-samples" if root else None)
    console.rule(f"3/5 evaluate DeiT-tiny on {data or '(no labelled images found)'}")
    if data is None:
        console.print("skipped: no dataset. Set DYNAVIT_ASSETS or run `dynavit eval MODEL --data DIR`.")
    else:
        res = evaluate(deit, open_dataset(data), limit=limit, progress=True)
        summary["deit_tiny_eval"] = {**res.to_json(), "data": str(data)}
        (out / "deit_tiny_eval.json").write_text(json.dumps(summary["deit_tiny_eval"], indent=2))
        for k in ("top1", "top5"):
            m = res.metrics[k]
            ci = f"95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f}"
            console.print(f"{k}: {m['value']:.4f} ({ci}) on {res.n_images} images")
        summary["sweep"] = _sweep(deit, data, out, limit, console)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold]wrote[/] {', '.join(_written_since(out, started))} to {out}/")
    return summary
