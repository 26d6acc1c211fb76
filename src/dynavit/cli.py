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
    from dynavit.data.datasets import list_images, read_image
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
    lm.save_calibration(out)
    order = ", ".join(map(str, cal.block_order()[:5]))
    console.print(f"calibrated on {cal.n_images} images in {cal.seconds:.1f}s; criterion {cal.criterion} "
                  f"(held-out KL {', '.join(f'{k} {v:.3f}' for k, v in cal.comparison.items()) or 'n/a'})")
    console.print(f"least important blocks first: {order} ...; wrote {out}/")


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
