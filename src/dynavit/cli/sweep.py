"""``dynavit sweep``, ``pareto`` (``--export``: its rows as a table) and ``report``: measure paths, read the menu."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dynavit.cli.kit import (
    DeviceOpt,
    LayoutOpt,
    LimitOpt,
    SkipBadOpt,
    StoreArg,
    console,
    fmt,
    interactive,
    outputs,
    print_wide,
    user_errors,
)
from dynavit.sweep.front import front_of_store
from dynavit.sweep.pareto import cost_label
from dynavit.sweep.run import SweepTarget, run_sweep
from dynavit.sweep.store import ResultStore
from dynavit.sweep.variants import variant_names

app = typer.Typer()

DataOpt = Annotated[Path, typer.Option(help="Labelled dataset folder (layout detected).")]
StoreOpt = Annotated[Path, typer.Option(help="SQLite result store; rerun the same command to resume.")]
SpaceOpt = Annotated[str, typer.Option(help="Search space: preset (default, small) or a JSON file.")]
StrategyOpt = Annotated[str, typer.Option(help="grid, random, greedy or evolutionary.")]
BudgetOpt = Annotated[int | None, typer.Option(help="How many configs to measure (needed except for grid).")]
BackendOpt = Annotated[str, typer.Option(help="local, or ray (spreads configs over a Ray cluster).")]
AddressOpt = Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray actors (default: one per CPU).")]
BatchOpt = Annotated[int, typer.Option(help="Evaluation (and throughput) batch size.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of random/evolutionary search and of the bootstrap.")]
RepeatsOpt = Annotated[int, typer.Option(help="Batch-1 latency samples per config; p50 and p95 are taken over "
                                                "them (a p95 of 20 samples is their second-largest).")]
ReuseOpt = Annotated[bool, typer.Option(help="Reuse activations of shared leading blocks.")]
MuxOpt = Annotated[list[Path] | None, typer.Option(
    help="A multiplexed model folder (dynavit train --mode multiplex) for configs with mux=N; "
         "repeatable. Add a mux knob to the space, e.g. {\"mux\": [1, 2]}.")]
CostOpt = Annotated[str, typer.Option(help="macs, latency_p50_ms, latency_p95_ms, batch_ms_per_image, energy_mj, "
                                           "or accel_energy_uj:DESIGN / accel_latency_ms:DESIGN.")]
TopOpt = Annotated[int, typer.Option(help="Show at most N rows.")]
AllOpt = Annotated[bool, typer.Option("--all", help="List every config, not only the front.")]
ModelsArg = Annotated[list[str], typer.Argument(
    help="Hugging Face hub id, local model folder, timm:<name>, or config:<preset>. Several models of one "
         "family: the first is the base, the others variants named by folder or hub name, and every "
         "variant's own paths go into the one store.")]
CalibsOpt = Annotated[list[Path] | None, typer.Option(
    "--calibration", help="Folder written by `dynavit calibrate`; with several models, once per model, in "
                          "their order.")]


@app.command("sweep")
@user_errors
def sweep_cmd(models: ModelsArg, data: DataOpt, store: StoreOpt = Path("results.db"), space: SpaceOpt = "default",
              strategy: StrategyOpt = "random", budget: BudgetOpt = None, backend: BackendOpt = "local",
              address: AddressOpt = None, workers: WorkersOpt = None, calibration: CalibsOpt = None,
              layout: LayoutOpt = None, limit: LimitOpt = None, batch_size: BatchOpt = 32, device: DeviceOpt = "cpu",
              seed: SeedOpt = 0, latency_repeats: RepeatsOpt = 50, reuse_prefix: ReuseOpt = True,
              skip_bad: SkipBadOpt = False, multiplexer: MuxOpt = None,
              dtype: Annotated[str, typer.Option(help="Also measure every config at these precisions "
                                                      "(comma list, e.g. int8).")] = "fp32") -> None:
    """Measure quality and cost of many execution paths; store each row; print the Pareto front."""
    calibs = [str(c) for c in calibration or ()]
    if calibs and len(calibs) != len(models):
        raise typer.BadParameter(f"{len(calibs)} --calibration for {len(models)} models: give one per model, "
                                 "in the models' order, or none", param_hint="--calibration")
    names = variant_names(models[1:])
    target = SweepTarget(model=models[0], data=str(data), layout=layout, calibration=calibs[0] if calibs else None,
                         limit=limit, skip_bad=skip_bad, batch_size=batch_size, device=device, seed=seed,
                         latency_repeats=latency_repeats, reuse_prefix=reuse_prefix,
                         multiplexers=tuple(multiplexer or ()), variants=dict(zip(names, models[1:], strict=True)),
                         variant_calibrations=dict(zip(names, calibs[1:], strict=False)))
    s = run_sweep(target, space=space if not Path(space).is_file() else Path(space), strategy=strategy,
                  budget=budget, store=store, backend=backend, address=address, workers=workers, seed=seed,
                  progress=interactive(), precisions=[d.strip() for d in dtype.split(",") if d.strip()])
    if s.excluded_calibration_images:
        console.print(f"left out {s.excluded_calibration_images} calibration images; evaluated {s.n_images}")
    console.print(f"measured {s.measured} configs, {s.reused} already in {store}, {s.invalid} invalid; "
                  f"{s.total} rows; {s.seconds:.0f} s")
    print_front(store, "macs", 20)


def print_front(store: Path, cost: str, top: int, show_all: bool = False) -> None:
    """The front (or every row) as a table: quality with CIs, paired deltas, MACs and measured times."""
    sf = front_of_store(store, cost)
    f, metric = sf.front, sf.meta.get("metric", "quality")
    t = Table(title=f"{sf.meta.get('model')}: {'all configs' if show_all else 'Pareto front'} by "
                    f"{cost_label(cost)} ({len(f.front)} of {sf.n_rows} configs; * = not significantly dominated)")
    t.add_column("config", min_width=24, overflow="fold")
    for col in (f"{metric} %", "95% CI", "Δ pts", "paired CI", "GMACs", "MACs −%", "p50 ms", "p95 ms", "img/s"):
        t.add_column(col, no_wrap=True, justify="right")
    idx = range(len(f.rows)) if show_all else f.front
    for i in list(idx)[:top]:
        r, red = f.rows[i], sf.reduction(f.rows[i])
        t.add_row(("*" if i in f.plausible else "") + r.label, f"{100 * r.quality:.1f}",
                  f"{100 * r.quality_lo:.1f}–{100 * r.quality_hi:.1f}", f"{100 * r.delta:+.1f}",
                  f"{100 * r.delta_lo:+.1f}–{100 * r.delta_hi:+.1f}", f"{r.macs / 1e9:.3f}",
                  fmt(None if red is None else 100 * red), fmt(r.latency_p50_ms, 2), fmt(r.latency_p95_ms, 2),
                  fmt(r.images_per_s))
    print_wide(t, 170)
    for w in f.warnings:  # latencies that drifted while they were measured
        console.print(f"[yellow]warning:[/] {w}")


RowsOpt = Annotated[Path | None, typer.Option("--export", help="Also write the store's rows (without per-image "
                                                                "data) to this .csv or .parquet file.")]


@app.command("pareto")
@user_errors
def pareto_cmd(store: StoreArg, cost: CostOpt = "macs", top: TopOpt = 50, show_all: AllOpt = False,
               export: RowsOpt = None) -> None:
    """The menu: configs not dominated in quality and cost, with CIs and paired deltas."""
    outputs((export, False, "--export"))
    print_front(store, cost, top, show_all)
    if export is not None:
        with ResultStore(store, readonly=True) as rs:
            console.print(f"wrote {rs.export(export)} ({len(rs)} rows)")


@app.command("report")
@user_errors
def report_cmd(store: StoreArg,
               out: Annotated[Path, typer.Option(help="Folder for index.html and the PNGs.")] = Path("report")) -> None:
    """A self-contained HTML report: fronts, per-knob resilience, FLOP vs time share."""
    from dynavit.report import write_report  # matplotlib: imported only by the command that draws

    ResultStore(store, readonly=True).close()  # a missing, foreign or damaged store before any folder is made
    outputs((out, True, "--out"))
    console.print(f"wrote {write_report(store, out)}")
