"""``dynavit simulate``, ``serve`` and ``infer``: the menu at run time, each inference within its budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.table import Table

from dynavit.cli.kit import DeviceOpt, JsonOpt, MovedDataOpt, console, interactive, outputs, print_wide, user_errors
from dynavit.errors import DynavitError
from dynavit.runtime.simulate import frame_scorer, hindsight_bounds, plot_trace, simulate
from dynavit.runtime.startup import start
from dynavit.runtime.traces import default_bounds, load_trace, make_trace
from dynavit.serve import client, load_for_store
from dynavit.sweep.store import images_at

app = typer.Typer()

RuleOpt = Annotated[str, typer.Option(help="priced: spend the miss allowance where it buys the most accuracy; "
                                           "quantile: every inference within target-miss on its own.")]
TargetMissOpt = Annotated[float, typer.Option(help="Share of inferences allowed to miss their budget.")]
MenuOpt = Annotated[Path, typer.Option(help="Result store of a classification sweep (the menu).")]
TraceOpt = Annotated[str, typer.Option(help="step, sine, random-walk, bursty, or a file of budgets (ms).")]
FramesOpt = Annotated[int, typer.Option(help="Frames in a generated trace.")]
LoOpt = Annotated[float | None, typer.Option(help="Tightest budget, ms (default 1.2x the cheapest p95).")]
HiOpt = Annotated[float | None, typer.Option(help="Loosest budget, ms (default 4x lo).")]
LoadAtOpt = Annotated[float | None, typer.Option(help="Start a competing CPU load at this fraction.")]
MarginOpt = Annotated[float, typer.Option(help="Safety margin on predicted latency.")]
SimProfileOpt = Annotated[int, typer.Option(help="Re-measure the candidate paths this many rounds (at least 3) "
                                                 "before the trace and keep the front by what was measured (0: "
                                                 "trust the store's latencies).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for inference (default: torch's).")]
SimRescueOpt = Annotated[bool, typer.Option(help="Measure what dropping blocks costs each path, then run each "
                                                 "inference under a deadline that drops the least important "
                                                 "remaining blocks when the run falls behind (needs a calibrated "
                                                 "ViT).")]
InterleaveOpt = Annotated[bool, typer.Option(help="Run the policies side by side, taking turns on each frame, "
                                                  "instead of one pass each: a paired comparison on a machine "
                                                  "whose speed drifts.")]
SimSeedOpt = Annotated[int, typer.Option(help="Seed of generated traces (and of the turns' order).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="Compile every candidate path once at start-up (torch."
                                                          "compile, minutes), so that switching never recompiles; "
                                                          "compiled paths run without deadlines.")]
RuntimeOpt = Annotated[str, typer.Option(help="torch, or onnxruntime: MODEL is a folder `dynavit export --store` "
                                              "wrote, and --store is not read.")]
SimPlotOpt = Annotated[Path | None, typer.Option(help="Write budgets vs measured latency per frame (PNG).")]
FrameImagesOpt = Annotated[Path | None, typer.Option(help="Labelled images to draw the frames from (default: the "
                                                          "half of the sweep's images that did not measure the "
                                                          "menu).")]


@app.command("simulate")
@user_errors
def simulate_cmd(store: MenuOpt, trace: TraceOpt = "random-walk", frames: FramesOpt = 300, lo: LoOpt = None,
                 hi: HiOpt = None, load_at: LoadAtOpt = None, margin: MarginOpt = 0.05,
                 profile_runs: SimProfileOpt = 50, threads: ThreadsOpt = None, rule: RuleOpt = "priced",
                 target_miss: TargetMissOpt = 0.01, rescue: SimRescueOpt = True, interleave: InterleaveOpt = False,
                 seed: SimSeedOpt = 0, json_out: JsonOpt = None, plot: SimPlotOpt = None,
                 frame_images: FrameImagesOpt = None, compile: CompileOpt = False,
                 data: MovedDataOpt = None) -> None:
    """Run real inferences frame by frame against per-frame budgets: controller vs baselines.

    The menu's qualities and rescue ladders are measured on half of the sweep's images; the frames
    are the other half (or --frame-images), so top-1 (or mIoU) is measured on images no choice has seen.
    """
    _profile_runs(profile_runs)
    outputs((json_out, False, "--json"), (plot, False, "--plot"))
    if load_at is not None and not 0 <= load_at < 1:
        raise DynavitError(f"--load-at must be in [0, 1), got {load_at}")
    if threads is not None:
        if threads < 1:
            raise DynavitError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    with images_at(data):
        s = start(store, profile_runs=profile_runs, rescue="auto" if rescue and not compile else False,
                  images=True, frames=frame_images, seed=seed, progress=interactive(), margin=margin, rule=rule,
                  target_miss=target_miss, compile=compile)
    ctrl = s.controller
    lo = lo or default_bounds(ctrl)[0]
    hi = hi or 4 * lo
    budgets = load_trace(trace) if Path(trace).is_file() else make_trace(trace, frames, lo, hi, seed)
    res = simulate(s.model, ctrl, s.frames.frames(), budgets, load_at=load_at, quality_of=s.quality_of,
                   held_out_of=s.held_out_of, interleave=interleave, seed=seed, progress=interactive(),
                   score=frame_scorer(s.frames))
    bounds = hindsight_bounds(res, ctrl.entries, target_miss)
    _print_simulation(res, budgets, trace, bounds)
    console.print(f"menu measured on {len(s.images['menu_images'])} images; frames drawn from "
                  f"{len(s.images['frame_images'])} others (overlap {s.images['overlap']})")
    if json_out:
        json_out.write_text(json.dumps({"trace": trace, "budgets": budgets.tolist(), "load_frame": res.load_frame,
                                        "policies": res.table(), "bounds": bounds, **s.images}, indent=2))
        console.print(f"wrote {json_out}")
    if plot:
        console.print(f"wrote {plot_trace(res, plot)}")


def _profile_runs(runs: int) -> None:
    """Re-timing needs 3 runs per path at least (a median and a spread); 0 skips it."""
    if runs != 0 and runs < 3:
        raise DynavitError(f"--profile-runs must be 0 (trust the store's latencies) or at least 3, got {runs}")


def _print_simulation(res: Any, budgets: np.ndarray, trace: str, bounds: dict[str, dict[str, float]]) -> None:
    """One row per policy, then the hindsight bounds."""
    t = Table(title=f"{len(budgets)} frames, budgets {budgets.min():.1f}-{budgets.max():.1f} ms ({trace})"
                    + (f", competing load from frame {res.load_frame}" if res.load_frame is not None else ""))
    metric = "mIoU" if res.task == "segmentation" else "top-1"
    cols = ["policy", "misses", "miss % [95% CI]", f"{metric} % (frames)", f"menu {metric} % (menu images)",
            "(frame images)", "p50 ms", "rescued"]
    if res.load_frame is not None:
        cols += ["misses before load", "misses under load"]
    for c in cols:
        t.add_column(c, justify="right" if c != "policy" else "left")
    for row in res.table():
        lo, hi = row["miss_ci"]
        cells = [row["policy"], str(row["misses"]), f"{100 * row['miss_rate']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                 f"{100 * row['quality']:.1f}", f"{100 * row['menu_quality']:.1f}",
                 f"{100 * row['held_out_quality']:.1f}",
                 f"{row['latency_p50_ms']:.1f}", str(row["rescued"])]
        if res.load_frame is not None:
            cells += [str(row["misses_before_load"]), str(row["misses_under_load"])]
        t.add_row(*cells)
    for name, b in bounds.items():  # what knowing the machine's speed (not each run's own jitter) would reach
        t.add_row(f"bound: {name}", str(round(b["miss_rate"] * len(budgets))), f"{100 * b['miss_rate']:.1f}", "",
                  f"{100 * b['menu_quality']:.1f}", "", "", *[""] * (len(cols) - 7))
    print_wide(t, 150)


ModelOpt = Annotated[str | None, typer.Argument(help="The store's model (default: the one the store names).")]
ServeStoreOpt = Annotated[Path, typer.Option(help="Result store of a sweep of MODEL: the menu.")]
ServeTokenOpt = Annotated[str | None, typer.Option(envvar="DYNAVIT_TOKEN",
                                                   help="Require 'Authorization: Bearer TOKEN'.")]
MaxBatchOpt = Annotated[int, typer.Option(help="Micro-batch size limit (1: no batching).")]
MaxWaitOpt = Annotated[float, typer.Option(help="How long a request may wait for batch mates.")]
MaxBodyOpt = Annotated[float, typer.Option(help="Largest accepted request body.")]
MaxPixelsOpt = Annotated[float, typer.Option(help="Largest accepted decoded image.")]
ServeProfileOpt = Annotated[int, typer.Option(help="Re-measure the menu's latencies this many rounds at start-up "
                                                   "(at least 3; 0: trust the store's).")]
ServeRescueOpt = Annotated[bool, typer.Option(help="At start-up, measure what dropping blocks costs each path on the "
                                                   "sweep's images (minutes; they must be where the sweep read "
                                                   "them), then run budgeted requests under a deadline that drops "
                                                   "the least important remaining blocks when a forward falls "
                                                   "behind (a calibrated ViT).")]


@app.command("serve")
@user_errors
def serve_cmd(model: ModelOpt = None, store: ServeStoreOpt = Path("results.db"),
              host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
              port: Annotated[int, typer.Option(help="TCP port.")] = 8000, token: ServeTokenOpt = None,
              max_batch: MaxBatchOpt = 8, max_wait_ms: MaxWaitOpt = 5.0, max_body_mb: MaxBodyOpt = 20.0,
              max_megapixels: MaxPixelsOpt = 40.0, device: DeviceOpt = "cpu", profile_runs: ServeProfileOpt = 50,
              rule: RuleOpt = "priced", target_miss: TargetMissOpt = 0.01, rescue: ServeRescueOpt = False,
              runtime: RuntimeOpt = "torch", compile: CompileOpt = False, data: MovedDataOpt = None,
              dtype: Annotated[str, typer.Option(help="Serve only the paths measured at these precisions "
                                                      "(comma list, e.g. int8); default: all.")] = "") -> None:
    """Serve /v1/infer: each request gets the most accurate path within its budget."""
    _profile_runs(profile_runs)
    try:  # the serve extra (fastapi, uvicorn) is optional
        import uvicorn

        from dynavit.serve.app import create_app
    except ImportError:
        raise DynavitError("serving needs the serve extra: pip install 'dynavit[serve]'") from None

    if max_batch < 1 or max_wait_ms < 0:
        raise DynavitError("--max-batch must be >= 1 and --max-wait-ms >= 0")
    with images_at(data):
        dm, ctrl = load_for_store(model, store, device, profile_runs, rescue=rescue, progress=interactive(),
                                  rule=rule, target_miss=target_miss, runtime=runtime, compile=compile,
                                  precisions=[d.strip() for d in dtype.split(",") if d.strip()])
    app = create_app(dm, ctrl, token=token, max_body_bytes=int(max_body_mb * 2**20),
                     max_pixels=int(max_megapixels * 1e6), max_batch=max_batch, max_wait_ms=max_wait_ms)
    rescuing = sum(bool(e.ladder) for e in ctrl.entries)
    console.print(f"serving {dm.source} with {len(ctrl.entries)} paths on http://{host}:{port}"
                  + (f"; {rescuing} of them under deadlines" if rescue else ""))
    held = getattr(dm, "memory_held", None)
    if held is not None:
        console.print("memory held: " + ", ".join(f"{k} {v['total'] / 2**20:.1f} MiB (parameters "
                                                  f"{v['parameters'] / 2**20:.1f})" for k, v in held().items()))
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


@app.command("infer")
@user_errors
def infer_cmd(image: Annotated[Path, typer.Argument(help="Image file to send.")],
              url: Annotated[str, typer.Option(help="Server address.")] = "http://127.0.0.1:8000",
              latency_ms: Annotated[float | None, typer.Option(help="Latency budget (ms).")] = None,
              energy_mj: Annotated[float | None, typer.Option(help="Energy budget (mJ).")] = None,
              gmacs: Annotated[float | None, typer.Option(help="Compute budget (GMACs).")] = None,
              config: Annotated[str | None, typer.Option(help="An explicit config name from /v1/configs.")] = None,
              token: Annotated[str | None, typer.Option(envvar="DYNAVIT_TOKEN", help="Bearer token.")] = None,
              json_out: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False) -> None:
    """Send one image to a running `dynavit serve` and print the answer."""
    answer = client.infer(image, url, latency_ms=latency_ms, energy_mj=energy_mj, gmacs=gmacs, config=config,
                          token=token)
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
