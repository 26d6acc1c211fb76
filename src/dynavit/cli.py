"""The ``dynavit`` command.

Every command turns a :class:`DynavitError` (bad user input) into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dynavit.clikit import _user_errors, console
from dynavit.errors import DynavitError

app = typer.Typer(
    help="Run-time adaptive inference of vision transformers: profile, evaluate, sweep, serve, cost on accelerators.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="Execution path: ExecConfig JSON, e.g. '{\"mlp_width\": 0.5}', or a .json file.")]
CalibOpt = Annotated[Path | None, typer.Option("--calibration", help="Folder written by `dynavit calibrate`.")]


def _load_configured(model: str, config: str | None, calibration: Path | None, device: str = "cpu"):
    """Load ``model`` and put it on the requested execution path (after applying a calibration)."""
    from dynavit.config import ExecConfig
    from dynavit.model import DynamicModel, load

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
    from dynavit.model import DynamicModel, load

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
    multiplexer: Annotated[list[Path] | None, typer.Option(
        help="A multiplexed model folder (dynavit train --mode multiplex) for configs with mux=N; "
             "repeatable. Add a mux knob to the space, e.g. {\"mux\": [1, 2]}.")] = None,
) -> None:
    """Measure quality and cost of many execution paths; store each row; print the Pareto front."""
    from dynavit.sweep.run import SweepTarget, run_sweep

    target = SweepTarget(model=model, data=str(data), layout=layout,
                         calibration=str(calibration) if calibration else None, limit=limit, skip_bad=skip_bad,
                         batch_size=batch_size, device=device, seed=seed, latency_repeats=latency_repeats,
                         reuse_prefix=reuse_prefix, multiplexers=tuple(str(m) for m in multiplexer or ()))
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

    from dynavit.sweep.pareto import cost_label, cost_of, pareto
    from dynavit.sweep.store import ResultStore

    with ResultStore(store, readonly=True) as rs:
        rows, meta = rs.rows(), rs.meta
    if not rows:
        raise DynavitError(f"{store} has no results yet; run `dynavit sweep` first")
    try:
        if all(cost_of(r, cost) is None for r in rows):
            raise DynavitError(f"no config in {store} has a value for {cost!r}")
    except ValueError as e:
        raise DynavitError(str(e)) from None
    f = pareto(rows, cost, task=meta.get("task", "classification"))
    base = next((r for r in rows if r.config.is_default), None)
    metric = meta.get("metric", "quality")
    t = Table(title=f"{meta.get('model')}: {'all configs' if show_all else 'Pareto front'} by {cost_label(cost)} "
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
    cost: Annotated[str, typer.Option(help="macs, latency_p50_ms, latency_p95_ms, batch_ms_per_image, energy_mj, "
                                           "or accel_energy_uj:DESIGN / accel_latency_ms:DESIGN.")] = "macs",
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


@app.command("simulate")
@_user_errors
def simulate_cmd(
    store: Annotated[Path, typer.Option(help="Result store of a classification sweep (the menu).")],
    trace: Annotated[str, typer.Option(help="step, sine, random-walk, bursty, or a file of budgets (ms).")
                     ] = "random-walk",
    frames: Annotated[int, typer.Option(help="Frames in a generated trace.")] = 300,
    lo: Annotated[float | None, typer.Option(help="Tightest budget, ms (default 1.2x the cheapest p95).")] = None,
    hi: Annotated[float | None, typer.Option(help="Loosest budget, ms (default 4x lo).")] = None,
    load_at: Annotated[float | None, typer.Option(help="Start a competing CPU load at this fraction.")] = None,
    margin: Annotated[float, typer.Option(help="Safety margin on predicted latency.")] = 0.05,
    profile_runs: Annotated[int, typer.Option(help="Re-measure the candidate paths this many rounds before the "
                                                   "trace and keep the front by what was measured (0: trust the "
                                                   "store's latencies).")] = 30,
    threads: Annotated[int | None, typer.Option(help="CPU threads for inference (default: torch's).")] = None,
    rule: Annotated[str, typer.Option(help="priced: spend the miss allowance where it buys the most accuracy; "
                                           "quantile: every frame within target-miss on its own.")] = "priced",
    target_miss: Annotated[float, typer.Option(help="Share of frames allowed to miss their budget.")] = 0.01,
    rescue: Annotated[bool, typer.Option(help="Measure what dropping blocks costs each path, then run each "
                                              "inference under a deadline that drops the least important "
                                              "remaining blocks when the run falls behind (needs a "
                                              "calibrated ViT).")] = True,
    interleave: Annotated[bool, typer.Option(help="Run the policies side by side, taking turns on each frame, "
                                                  "instead of one pass each: a paired comparison on a machine "
                                                  "whose speed drifts.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of generated traces (and of the turns' order).")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write per-policy results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write budgets vs measured latency per frame (PNG).")] = None,
) -> None:
    """Run real inferences frame by frame against per-frame budgets: controller vs baselines."""
    from dynavit.runtime import Controller
    from dynavit.runtime.simulate import (
        default_bounds,
        hindsight_bounds,
        load_trace,
        make_trace,
        path_quality,
        plot_trace,
        simulate,
    )
    from dynavit.sweep.run import SweepTarget
    from dynavit.sweep.store import ResultStore

    with ResultStore(store, readonly=True) as rs:
        target = SweepTarget(**rs.last_target())
    if load_at is not None and not 0 <= load_at < 1:
        raise DynavitError(f"--load-at must be in [0, 1), got {load_at}")
    if threads is not None:
        if threads < 1:
            raise DynavitError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    dm, data, _, _ = target.build(progress=sys.stderr.isatty())
    if data.task != "classification":
        raise DynavitError("simulate scores classification sweeps (top-1 per frame); this store is "
                           f"{data.task}")
    frames_data = data.frames()
    ctrl = Controller.from_store(store, model=dm, margin=margin, probe=frames_data[0][0] if profile_runs else None,
                                 runs=profile_runs, progress=sys.stderr.isatty(), rule=rule, target_miss=target_miss,
                                 rescue=rescue)
    quality_of = path_quality(dm, data)
    if ctrl.can_rescue:  # what dropping blocks costs each path, measured on the sweep's images
        ctrl.measure_rescue(quality_of, progress=sys.stderr.isatty())
    lo = lo or default_bounds(ctrl)[0]
    hi = hi or 4 * lo
    budgets = load_trace(trace) if Path(trace).is_file() else make_trace(trace, frames, lo, hi, seed)
    res = simulate(dm, ctrl, frames_data, budgets, load_at=load_at, quality_of=quality_of, interleave=interleave,
                   seed=seed, progress=sys.stderr.isatty())
    from rich.table import Table

    t = Table(title=f"{len(budgets)} frames, budgets {budgets.min():.1f}-{budgets.max():.1f} ms ({trace})"
                    + (f", competing load from frame {res.load_frame}" if res.load_frame is not None else ""))
    cols = ["policy", "misses", "miss %", "top-1 %", "menu top-1 %", "p50 ms", "rescued"]
    if res.load_frame is not None:
        cols += ["misses before load", "misses under load"]
    for c in cols:
        t.add_column(c, justify="right" if c != "policy" else "left")
    for row in res.table():
        cells = [row["policy"], str(row["misses"]), f"{100 * row['miss_rate']:.1f}", f"{100 * row['top1']:.1f}",
                 f"{100 * row['menu_top1']:.1f}", f"{row['latency_p50_ms']:.1f}", str(row["rescued"])]
        if res.load_frame is not None:
            cells += [str(row["misses_before_load"]), str(row["misses_under_load"])]
        t.add_row(*cells)
    bounds = hindsight_bounds(res, ctrl.entries, target_miss)
    for name, b in bounds.items():  # what knowing the machine's speed (not each run's own jitter) would reach
        t.add_row(f"bound: {name}", str(round(b["miss_rate"] * len(budgets))), f"{100 * b['miss_rate']:.1f}", "",
                  f"{100 * b['menu_top1']:.1f}", "", *[""] * (len(cols) - 6))
    (console if console.is_terminal else Console(width=150)).print(t)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"trace": trace, "budgets": budgets.tolist(), "load_frame": res.load_frame,
                                        "policies": res.table(), "bounds": bounds}, indent=2))
        console.print(f"wrote {json_out}")
    if plot:
        console.print(f"wrote {plot_trace(res, plot)}")


@app.command("serve")
@_user_errors
def serve_cmd(
    model: Annotated[str | None, typer.Argument(help="The store's model (default: the one the store names).")
                     ] = None,
    store: Annotated[Path, typer.Option(help="Result store of a sweep of MODEL: the menu.")] = Path("results.db"),
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="DYNAVIT_TOKEN", help="Require 'Authorization: Bearer TOKEN'.")
                     ] = None,
    max_batch: Annotated[int, typer.Option(help="Micro-batch size limit (1: no batching).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request may wait for batch mates.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest accepted request body.")] = 20.0,
    max_megapixels: Annotated[float, typer.Option(help="Largest accepted decoded image.")] = 40.0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    profile_runs: Annotated[int, typer.Option(help="Re-measure the menu's latencies this many rounds at start-up "
                                                   "(0: trust the store's).")] = 20,
    rule: Annotated[str, typer.Option(help="priced: spend the miss allowance where it buys the most accuracy; "
                                           "quantile: every request within target-miss on its own.")] = "priced",
    target_miss: Annotated[float, typer.Option(help="Share of requests allowed to miss their budget.")] = 0.01,
    rescue: Annotated[bool, typer.Option(help="At start-up, measure what dropping blocks costs each path on the "
                                              "sweep's images (minutes; they must be where the sweep read "
                                              "them), then run budgeted requests under a deadline that drops "
                                              "the least important remaining blocks when a forward falls "
                                              "behind (a calibrated ViT).")] = False,
) -> None:
    """Serve /v1/infer: each request gets the most accurate path within its budget."""
    try:
        import uvicorn

        from dynavit.serve.app import create_app
    except ImportError:
        raise DynavitError("serving needs the serve extra: pip install 'dynavit[serve]'") from None
    from dynavit.serve import load_for_store

    if max_batch < 1 or max_wait_ms < 0:
        raise DynavitError("--max-batch must be >= 1 and --max-wait-ms >= 0")
    dm, ctrl = load_for_store(model, store, device, profile_runs, rescue=rescue, progress=sys.stderr.isatty(),
                              rule=rule, target_miss=target_miss)
    app = create_app(dm, ctrl, token=token, max_body_bytes=int(max_body_mb * 2**20),
                     max_pixels=int(max_megapixels * 1e6), max_batch=max_batch, max_wait_ms=max_wait_ms)
    rescuing = sum(bool(e.ladder) for e in ctrl.entries)
    console.print(f"serving {dm.source} with {len(ctrl.entries)} paths on http://{host}:{port}"
                  + (f"; {rescuing} of them under deadlines" if rescue else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


@app.command("infer")
@_user_errors
def infer_cmd(
    image: Annotated[Path, typer.Argument(help="Image file to send.")],
    url: Annotated[str, typer.Option(help="Server address.")] = "http://127.0.0.1:8000",
    latency_ms: Annotated[float | None, typer.Option(help="Latency budget (ms).")] = None,
    energy_mj: Annotated[float | None, typer.Option(help="Energy budget (mJ).")] = None,
    gmacs: Annotated[float | None, typer.Option(help="Compute budget (GMACs).")] = None,
    config: Annotated[str | None, typer.Option(help="An explicit config name from /v1/configs.")] = None,
    token: Annotated[str | None, typer.Option(envvar="DYNAVIT_TOKEN", help="Bearer token.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
) -> None:
    """Send one image to a running `dynavit serve` and print the answer."""
    import mimetypes
    import urllib.error
    import urllib.parse
    import urllib.request

    if not image.is_file():
        raise DynavitError(f"image {image} does not exist")
    params = {k: v for k, v in (("latency_ms", latency_ms), ("energy_mj", energy_mj), ("gmacs", gmacs),
                                ("config", config)) if v is not None}
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/infer?{urllib.parse.urlencode(params)}",
                                 data=image.read_bytes(), method="POST",
                                 headers={"Content-Type": mimetypes.guess_type(image.name)[0] or
                                          "application/octet-stream"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            msg = e.reason
        raise DynavitError(f"server answered {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise DynavitError(f"cannot reach {url}: {e.reason}") from None
    if json_out:
        console.print_json(data=answer)
        return
    c = answer["config"]
    console.print(f"path {c['name']} ({c['label']}): {answer['measured_ms']:.1f} ms measured"
                  + (f", {answer['predicted_ms']:.1f} ms predicted" if answer.get("predicted_ms") else "")
                  + f", budget met: {answer['budget_met']}")
    for t in answer.get("topk", []):
        console.print(f"  {100 * t['probability']:5.1f} %  {t['label']}")
    if "classes" in answer:
        console.print("  classes: " + ", ".join(answer["classes"].values()))


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DynavitError(f"{option} takes comma-separated numbers, got {text!r}") from None


@app.command("train")
@_user_errors
def train_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or hub id, or config:<preset> to train from scratch.")],
    data: Annotated[Path, typer.Option(help="Labelled training dataset folder.")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint/ (resumed if present) and model/.")],
    mode: Annotated[str, typer.Option(help="supervised; paths (weight-shared retraining of a space of execution "
                                           "paths); sait (dense/sparse token densities); multiplex (distil MODEL "
                                           "into a multiplexed model).")] = "supervised",
    eval_data: Annotated[Path | None, typer.Option(help="Held-out dataset scored at the end.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, warm-up, polynomial decay); default "
                                                  "6e-4, or 1e-5 for paths and sait (they fine-tune a trained "
                                                  "model, whose default path must keep its accuracy).")] = None,
    crop: Annotated[tuple[int, int] | None, typer.Option(
        help="Training crop (H W); default 256 320 (supervised), the model's input size (multiplex).")] = None,
    input_size: Annotated[tuple[int, int] | None, typer.Option(help="Evaluation input size (H W) of the "
                                                                     "exported model.")] = None,
    seed: Annotated[int, typer.Option(help="Seed: batch order, augmentation, initialisation.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 50,
    class_weights: Annotated[str, typer.Option(help="segmentation: none, or median-freq (median frequency "
                                                    "balancing, for class-averaged mIoU).")] = "none",
    mux: Annotated[int, typer.Option(help="multiplex: images per forward pass (N).")] = 2,
    arch: Annotated[str, typer.Option(help="multiplex: concatplexer or imagemux.")] = "concatplexer",
    patchifier_depth: Annotated[int, typer.Option(help="multiplex: ViT blocks run per image before muxing.")] = 1,
    labels: Annotated[bool, typer.Option(help="paths, sait, multiplex: use the labels (--no-labels: distil from "
                                              "the model as loaded, on images alone).")] = True,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature (default 1 for paths and "
                                                           "sait, 2 for multiplex).")] = None,
    label_weight: Annotated[float, typer.Option(help="paths, sait: share of the label cross-entropy in the "
                                                     "default path's loss; the rest distils from the model as "
                                                     "loaded (1: labels only).")] = 1.0,
    default_weight: Annotated[float, typer.Option(help="paths, sait: weight of the default path's loss against "
                                                       "each other path's (3 kept SaiT's dense path on "
                                                       "Fashion-MNIST; 1 let it drop 1.3 pt).")] = 1.0,
    space: Annotated[str, typer.Option(help="paths: search space, a preset (default, small) or JSON file.")] = "small",
    random_paths: Annotated[int, typer.Option(help="paths, sait: random paths per step besides the default "
                                                   "and the smallest.")] = 2,
    densities: Annotated[str, typer.Option(help="sait: token keep rates, comma-separated.")] = "0.8,0.7,0.6,0.5",
    token_layers: Annotated[str | None, typer.Option(help="sait: blocks after which tokens are pruned, "
                                                          "comma-separated (default: 1/4, 1/2, 3/4 of the depth).")
                            ] = None,
    token_distill: Annotated[float, typer.Option(help="sait: weight of the early token-selection "
                                                      "distillation.")] = 0.1,
    calibration: CalibOpt = None,
) -> None:
    """Train a model on a labelled dataset; resumable; exports a loadable model with a model card.

    --mode paths and --mode sait retrain one set of weights for many execution paths (sandwich rule,
    in-place distillation from the default path); --no-labels trains on images alone. --mode multiplex
    trains a ConcatPlexer or Image Multiplexer initialised from MODEL's weights, with MODEL as its
    teacher; attach the result with DynamicModel.add_multiplexer(OUT/model).
    """

    from dynavit.data import open_dataset
    from dynavit.model import from_config, load
    from dynavit.models.configs import preset_config
    from dynavit.train.supervised import Recipe, export, run_card, train_supervised

    if mode not in ("supervised", "paths", "sait", "multiplex"):
        raise DynavitError(f"--mode {mode} does not exist; use supervised, paths, sait or multiplex")
    dataset = open_dataset(data)
    if model.startswith("config:"):
        cfg = preset_config(model.removeprefix("config:"))
        cfg.num_labels = dataset.num_classes
        cfg.id2label = {i: n for i, n in enumerate(getattr(dataset, "class_names", []) or
                                                    [str(i) for i in range(dataset.num_classes)])}
        cfg.label2id = {n: i for i, n in cfg.id2label.items()}
        lm = from_config(cfg, seed=seed, source=model)
    else:
        lm = load(model)
    if calibration is not None:
        if not hasattr(lm, "load_calibration"):
            raise DynavitError(f"{model} ({lm.family}) has no execution paths to calibrate; drop --calibration")
        lm.load_calibration(calibration)
    if input_size:
        lm.input_size = tuple(input_size)
    crop = tuple(crop or ((256, 320) if dataset.task == "segmentation" else lm.input_size))
    lr = lr or (1e-5 if mode in ("paths", "sait") else 6e-4)
    recipe = Recipe(steps=steps, batch_size=batch_size, lr=lr, crop=crop, seed=seed,
                    checkpoint_every=checkpoint_every, warmup=warmup, class_weights=class_weights)
    if mode == "multiplex":
        from dynavit.train.multiplex import train_multiplex_and_save

        train_multiplex_and_save(lm, dataset, out, recipe, arch=arch, mux=mux, patchifier_depth=patchifier_depth,
                                 labels=labels, temperature=temperature or 2.0, eval_data=eval_data, console=console)
        return
    if mode in ("paths", "sait"):
        from dynavit.train.paths import train_paths_and_save

        train_paths_and_save(lm, dataset, out, recipe, mode=mode, space=space, random_paths=random_paths,
                             densities=_floats(densities, "--densities"),
                             token_layers=None if token_layers is None else
                             [int(v) for v in _floats(token_layers, "--token-layers")],
                             token_distill=token_distill, labels=labels, temperature=temperature or 1.0,
                             label_weight=label_weight, default_weight=default_weight,
                             eval_data=eval_data, console=console)
        return
    res = train_supervised(lm, dataset, out, recipe, progress=sys.stderr.isatty())
    card = {"name": f"{model} trained on {data}", **run_card(dataset, recipe, res)}
    if eval_data is not None:
        from dynavit.evaluation import evaluate

        ev = evaluate(lm, open_dataset(eval_data), progress=sys.stderr.isatty())
        key = "miou" if "miou" in ev.metrics else "top1"
        m = ev.metrics[key]
        card[f"held-out {key}"] = f"{m['value']:.4f} (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f}) on {eval_data}"
        console.print(f"held-out {key} {m['value']:.4f} (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    console.print(f"wrote {export(lm, out / 'model', card)} (load it with dynavit.load)")


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


from dynavit.cli_accel import accel_app  # noqa: E402 - needs _user_errors and console above

app.add_typer(accel_app, name="accel")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
