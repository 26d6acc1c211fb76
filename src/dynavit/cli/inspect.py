"""``dynavit profile``, ``eval`` and ``calibrate``: one model, one execution path, looked at closely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dynavit.cli.kit import (
    CalibOpt,
    ConfigOpt,
    DeviceOpt,
    JsonOpt,
    LayoutOpt,
    LimitOpt,
    ModelArg,
    SkipBadOpt,
    console,
    interactive,
    outputs,
    user_errors,
)
from dynavit.configured import calibrate_folder, load_configured, parse_config
from dynavit.cost import profile
from dynavit.data import open_dataset
from dynavit.evaluation import evaluate

app = typer.Typer()

SizeOpt = Annotated[tuple[int, int] | None, typer.Option(help="Input height and width.")]
RepeatsOpt = Annotated[int | None, typer.Option(help="Timed repetitions (default: fit ~8 s).")]
PlotOpt = Annotated[Path | None, typer.Option(help="Write a FLOP-share vs time-share bar chart (PNG).")]
ModulesOpt = Annotated[int, typer.Option(help="Show the top modules down to this depth (0: none).")]
DataOpt = Annotated[Path, typer.Option(help="Dataset folder (layout detected).")]
ImagesOpt = Annotated[Path, typer.Option(help="Folder of calibration images (unlabelled; searched recursively).")]
CalibOutOpt = Annotated[Path, typer.Option(help="Where to write calibration.safetensors + calibration.json.")]
CriterionOpt = Annotated[str, typer.Option(help="auto (measure each, keep the best), magnitude, variance or taylor.")]


@app.command("profile")
@user_errors
def profile_cmd(model: ModelArg, input_size: SizeOpt = None,
                batch: Annotated[int, typer.Option(help="Batch size.")] = 1, device: DeviceOpt = "cpu",
                dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
                repeats: RepeatsOpt = None, json_out: JsonOpt = None, plot: PlotOpt = None, modules: ModulesOpt = 2,
                config: ConfigOpt = None, calibration: CalibOpt = None) -> None:
    """Exact MACs/FLOPs per operator class and per module, next to measured time per class."""
    outputs((json_out, False, "--json"), (plot, False, "--plot"))
    dm = load_configured(model, config=parse_config(config) if config else None, calibration=calibration)
    p = profile(dm, input_size=input_size, batch=batch, device=device, dtype=dtype, repeats=repeats)
    console.print(p.table())
    if modules:
        console.print(p.module_table(max_depth=modules, top=20))
    if json_out:
        console.print(f"wrote {p.save_json(json_out)}")
    if plot:
        console.print(f"wrote {p.plot(plot)}")


@app.command("eval")
@user_errors
def eval_cmd(model: ModelArg, data: DataOpt, layout: LayoutOpt = None,
             batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
             limit: LimitOpt = None, skip_bad: SkipBadOpt = False, device: DeviceOpt = "cpu",
             json_out: JsonOpt = None, config: ConfigOpt = None, calibration: CalibOpt = None,
             dtype: Annotated[str, typer.Option(help="Precision of the linear layers: fp32, int8, fp16 or bf16.")
                              ] = "fp32") -> None:
    """Accuracy (top-1/top-5) or mIoU/pixel accuracy, each with a bootstrap 95% CI."""
    outputs((json_out, False, "--json"))
    cfg = parse_config(config) if config else None
    dataset = open_dataset(data, layout=layout)
    dm = load_configured(model, config=cfg, calibration=calibration, device=device, dtype=dtype)
    res = evaluate(dm, dataset, batch_size=batch_size, skip_bad=skip_bad, limit=limit, progress=interactive())
    for key in ("top1", "top5", "miou", "pix_acc"):
        if key in res.metrics:
            m = res.metrics[key]
            console.print(f"{key:8s} {m['value']:.4f}  (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    console.print(f"images {res.n_images}, skipped {res.n_skipped}, {res.images_per_s:.1f} img/s")
    if json_out:
        out = {**res.to_json(), "model": dm.source, "data": str(data), "layout": dataset.layout,
               "config": dm.exec_config.to_dict()}
        json_out.write_text(json.dumps(out, indent=2))
        console.print(f"wrote {json_out}")


@app.command("calibrate")
@user_errors
def calibrate_cmd(model: ModelArg, images: ImagesOpt, out: CalibOutOpt, criterion: CriterionOpt = "auto",
                  limit: Annotated[int, typer.Option(min=1, help="Use at most this many images (spread over the "
                                                                 "folder; at least 1).")] = 64,
                  compensate: Annotated[bool, typer.Option(help="Also restore what removed channels, heads and "
                                                                "skipped sub-layers contributed (closed form, "
                                                                "method chosen on held-out images).")] = True) -> None:
    """Rank channels, heads and blocks by importance and save the reordering (applied with --calibration)."""
    outputs((out, True, "--out"))
    cal = calibrate_folder(model, images, out, criterion=criterion, limit=limit, compensate=compensate,
                           progress=interactive())
    order = ", ".join(map(str, cal.block_order()[:5]))
    kl = ", ".join(f"{k} {v:.3f}" for k, v in cal.comparison.items()) or "n/a"
    console.print(f"calibrated on {cal.n_images} images in {cal.seconds:.1f}s; criterion {cal.criterion} "
                  f"(held-out KL {kl})")
    if cal.compensation is not None:
        comp = cal.compensation
        kl = ", ".join(f"{k} {v:.3f}" for k, v in comp.comparison.items())
        ridges = "".join(f", {g} ridge {r:g}" for g, r in comp.ridges.items())
        console.print(f"compensation {comp.method}{ridges}, skipped sub-layers' means "
                      f"{'added' if comp.skip_means else 'not added'} (held-out KL {kl})")
    console.print(f"least important blocks first: {order} ...; wrote {out}/")
