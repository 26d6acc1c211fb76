"""The ``dynavit`` command.

Every command turns a :class:`DynavitError` (bad user input) into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dynavit.errors import DynavitError

app = typer.Typer(
    help="Run-time adaptive inference of vision transformers: profile, evaluate, and (soon) adapt.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor loading bars drown the CLI's own output
        try:
            return fn(*args, **kwargs)
        except DynavitError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="Execution path: ExecConfig JSON, e.g. '{\"mlp_width\": 0.5}', or a .json file.")]
CalibOpt = Annotated[Path | None, typer.Option("--calibration", help="Folder written by `dynavit calibrate`.")]


def _load_configured(model: str, config: str | None, calibration: Path | None, device: str = "cpu"):
    """Load ``model`` and put it on the requested execution path (after applying a calibration)."""
    from dynavit.config import ExecConfig
    from dynavit.dynamic import DynamicModel
    from dynavit.models import load

    lm = load(model, device=device)
    if config is None and calibration is None:
        return lm
    if not isinstance(lm, DynamicModel):
        raise DynavitError(f"{model} ({lm.family}) has no execution paths yet; drop --config/--calibration")
    if calibration is not None:
        lm.load_calibration(calibration)
    if config is not None:
        text = Path(config).read_text() if config.endswith(".json") and Path(config).is_file() else config
        lm.configure(ExecConfig.from_json(text))
    return lm


@app.command("profile")
@_user_errors
def profile_cmd(
    model: Annotated[str, typer.Argument(help="Hugging Face hub id, local model folder, or timm:<name>.")],
    input_size: Annotated[tuple[int, int] | None, typer.Option(help="Input height and width.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    repeats: Annotated[int | None, typer.Option(help="Timed repetitions (default: fit ~8 s).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full profile as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a FLOP-share vs time-share bar chart (PNG).")] = None,
    modules: Annotated[int, typer.Option(help="Show the top modules down to this depth (0: none).")] = 2,
    config: ConfigOpt = None,
    calibration: CalibOpt = None,
) -> None:
    """Exact MACs/FLOPs per operator class and per module, next to measured time per class."""
    from dynavit.cost import profile

    lm = _load_configured(model, config, calibration)
    if input_size is not None:
        lm.check_input_size(*input_size)
    p = profile(lm, input_size=input_size, batch=batch, device=device, dtype=dtype, repeats=repeats)
    console.print(p.table())
    if modules:
        console.print(p.module_table(max_depth=modules, top=20))
    if json_out:
        console.print(f"wrote {p.save_json(json_out)}")
    if plot:
        console.print(f"wrote {p.plot(plot)}")


@app.command("eval")
@_user_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Hugging Face hub id, local model folder, or timm:<name>.")],
    data: Annotated[Path, typer.Option(help="Dataset folder (layout detected).")],
    layout: Annotated[str | None, typer.Option(help="Force a dataset layout instead of detecting it.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Evaluate N images spread evenly over the dataset.")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip and count unreadable images.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics as JSON.")] = None,
    config: ConfigOpt = None,
    calibration: CalibOpt = None,
) -> None:
    """Accuracy (top-1/top-5) or mIoU/pixel accuracy, each with a bootstrap 95% CI."""
    from dynavit.data import open_dataset
    from dynavit.evaluation import evaluate

    dataset = open_dataset(data, layout=layout)
    lm = _load_configured(model, config, calibration, device)
    res = evaluate(lm, dataset, batch_size=batch_size, skip_bad=skip_bad, limit=limit, progress=sys.stderr.isatty())
    out = res.to_json()
    out.update(model=lm.source, data=str(data), layout=dataset.layout,
               config=getattr(getattr(lm, "exec_config", None), "to_dict", dict)())
    for key in ("top1", "top5", "miou", "pix_acc"):
        if key in res.metrics:
            m = res.metrics[key]
            console.print(f"{key:8s} {m['value']:.4f}  (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    console.print(f"images {res.n_images}, skipped {res.n_skipped}, {res.images_per_s:.1f} img/s")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=2))
        console.print(f"wrote {json_out}")


@app.command("calibrate")
@_user_errors
def calibrate_cmd(
    model: Annotated[str, typer.Argument(help="Hugging Face hub id, local model folder, or config:<preset>.")],
    images: Annotated[Path, typer.Option(help="Folder of calibration images (unlabelled; searched recursively).")],
    out: Annotated[Path, typer.Option(help="Where to write calibration.safetensors + calibration.json.")],
    criterion: Annotated[str, typer.Option(help="auto (measure both, keep the better), magnitude or taylor.")] = "auto",
    limit: Annotated[int, typer.Option(help="Use at most this many images (spread over the folder).")] = 64,
) -> None:
    """Rank channels, heads and blocks by importance and save the reordering (applied with --calibration)."""
    from dynavit.data.datasets import file_sha1, list_images, read_image
    from dynavit.dynamic import DynamicModel
    from dynavit.models import load

    lm = load(model)
    if not isinstance(lm, DynamicModel):
        raise DynavitError(f"{model} ({lm.family}) has no execution paths to calibrate yet")
    if not images.is_dir():
        raise DynavitError(f"image folder {images} does not exist")
    paths = list_images(images, recursive=True)
    if not paths:
        raise DynavitError(f"no images found under {images}")
    paths = paths[:: max(1, len(paths) // limit)][:limit]
    cal = lm.calibrate([read_image(p) for p in paths], criterion=criterion)
    cal.image_hashes = [file_sha1(p) for p in paths]  # a sweep on the same folder leaves these out
    lm.save_calibration(out)
    order = ", ".join(map(str, cal.block_order()[:5]))
    console.print(f"calibrated on {cal.n_images} images in {cal.seconds:.1f}s; criterion {cal.criterion} "
                  f"(held-out KL {', '.join(f'{k} {v:.3f}' for k, v in cal.comparison.items()) or 'n/a'})")
    console.print(f"least important blocks first: {order} ...; wrote {out}/")


@app.command("sweep")
@_user_errors
def sweep_cmd(
    model: Annotated[str, typer.Argument(help="Hugging Face hub id or local model folder.")],
    data: Annotated[Path, typer.Option(help="Labelled dataset folder (layout detected).")],
    store: Annotated[Path, typer.Option(help="SQLite result store; rerun the same command to resume.")] = Path(
        "results.db"),
    space: Annotated[str, typer.Option(help="Search space: preset (default, small) or a JSON file.")] = "default",
    strategy: Annotated[str, typer.Option(help="grid, random, greedy or evolutionary.")] = "random",
    budget: Annotated[int | None, typer.Option(help="How many configs to measure (needed except for grid).")] = None,
    backend: Annotated[str, typer.Option(help="local, or ray (spreads configs over a Ray cluster).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray actors (default: one per CPU).")] = None,
    calibration: CalibOpt = None,
    layout: Annotated[str | None, typer.Option(help="Force a dataset layout instead of detecting it.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use N images spread evenly over the dataset.")] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation (and throughput) batch size.")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of random/evolutionary search and of the bootstrap.")] = 0,
    latency_repeats: Annotated[int, typer.Option(help="Batch-1 latency samples per config.")] = 20,
    reuse_prefix: Annotated[bool, typer.Option(help="Reuse activations of shared leading blocks.")] = True,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip and count unreadable images.")] = False,
) -> None:
    """Measure quality and cost of many execution paths; store each row; print the Pareto front."""
    from dynavit.sweep.run import SweepTarget, run_sweep

    target = SweepTarget(model=model, data=str(data), layout=layout,
                         calibration=str(calibration) if calibration else None, limit=limit, skip_bad=skip_bad,
                         batch_size=batch_size, device=device, seed=seed, latency_repeats=latency_repeats,
                         reuse_prefix=reuse_prefix)
    s = run_sweep(target, space=space if not Path(space).is_file() else Path(space), strategy=strategy,
                  budget=budget, store=store, backend=backend, address=address, workers=workers, seed=seed,
                  progress=sys.stderr.isatty())
    if s.excluded_calibration_images:
        console.print(f"left out {s.excluded_calibration_images} calibration images; evaluated {s.n_images}")
    console.print(f"measured {s.measured} configs, {s.reused} already in {store}, {s.invalid} invalid; "
                  f"{s.total} rows; {s.seconds:.0f} s")
    _print_front(store, "macs", 20)


def _fmt(v: float | None, places: int = 1) -> str:
    return "" if v is None else f"{v:.{places}f}"


def _print_front(store: Path, cost: str, top: int, show_all: bool = False) -> None:
    from rich.table import Table

    from dynavit.sweep.pareto import COSTS, pareto
    from dynavit.sweep.store import ResultStore

    with ResultStore(store, readonly=True) as rs:
        rows, meta = rs.rows(), rs.meta
    if not rows:
        raise DynavitError(f"{store} has no results yet; run `dynavit sweep` first")
    if cost not in COSTS:
        raise DynavitError(f"unknown cost {cost!r} (choose from {', '.join(COSTS)})")
    f = pareto(rows, cost, task=meta.get("task", "classification"))
    base = next((r for r in rows if r.config.is_default), None)
    metric = meta.get("metric", "quality")
    t = Table(title=f"{meta.get('model')}: {'all configs' if show_all else 'Pareto front'} by {COSTS[cost]} "
                    f"({len(f.front)} of {len(rows)} configs; * = not significantly dominated)")
    t.add_column("config", min_width=24, overflow="fold")
    for col in (f"{metric} %", "95% CI", "Δ pts", "paired CI", "GMACs", "MACs −%", "p50 ms", "p95 ms", "img/s"):
        t.add_column(col, no_wrap=True, justify="right")
    idx = range(len(f.rows)) if show_all else f.front
    for i in list(idx)[:top]:
        r = f.rows[i]
        red = f"{100 * (1 - r.macs / base.macs):.1f}" if base else ""
        t.add_row(("*" if i in f.plausible else "") + r.label, f"{100 * r.quality:.1f}",
                  f"{100 * r.quality_lo:.1f}–{100 * r.quality_hi:.1f}", f"{100 * r.delta:+.1f}",
                  f"{100 * r.delta_lo:+.1f}–{100 * r.delta_hi:+.1f}", f"{r.macs / 1e9:.3f}", red,
                  _fmt(r.latency_p50_ms, 2), _fmt(r.latency_p95_ms, 2), _fmt(r.images_per_s))
    (console if console.is_terminal else Console(width=170)).print(t)  # piped: do not fold at 80


@app.command("pareto")
@_user_errors
def pareto_cmd(
    store: Annotated[Path, typer.Argument(help="Result store written by `dynavit sweep`.")],
    cost: Annotated[str, typer.Option(help="macs, latency_p50_ms, latency_p95_ms, batch_ms_per_image, energy_mj.")
                    ] = "macs",
    top: Annotated[int, typer.Option(help="Show at most N rows.")] = 50,
    show_all: Annotated[bool, typer.Option("--all", help="List every config, not only the front.")] = False,
) -> None:
    """The menu: configs not dominated in quality and cost, with CIs and paired deltas."""
    _print_front(store, cost, top, show_all)


@app.command("export")
@_user_errors
def export_cmd(
    store: Annotated[Path, typer.Argument(help="Result store written by `dynavit sweep`.")],
    out: Annotated[Path, typer.Argument(help="A .csv or .parquet file.")],
) -> None:
    """Write the store's rows (without per-image data) as CSV or Parquet."""
    from dynavit.sweep.store import ResultStore

    with ResultStore(store, readonly=True) as rs:
        console.print(f"wrote {rs.export(out)} ({len(rs)} rows)")


@app.command("report")
@_user_errors
def report_cmd(
    store: Annotated[Path, typer.Argument(help="Result store written by `dynavit sweep`.")],
    out: Annotated[Path, typer.Option(help="Folder for index.html and the PNGs.")] = Path("report"),
) -> None:
    """A self-contained HTML report: fronts, per-knob resilience, FLOP vs time share."""
    from dynavit.report import write_report

    console.print(f"wrote {write_report(store, out)}")


@app.command("demo")
@_user_errors
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Where tables, JSON and charts go.")] = Path("out"),
    limit: Annotated[int | None, typer.Option(help="Evaluate N images spread evenly over the dataset.")] = None,
    data: Annotated[Path | None, typer.Option(help="Labelled images for the evaluation step.")] = None,
) -> None:
    """Profile DeiT-tiny and SegFormer-B2, evaluate DeiT-tiny on ImageNet samples, write to OUT."""
    from dynavit.demo import run_demo

    run_demo(out, limit=limit, console=console, data=data)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
