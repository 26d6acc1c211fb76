"""``dynavit export`` and ``predict``: paths as files for other runtimes, and predictions over a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynavit.cli.kit import CalibOpt, ConfigOpt, DeviceOpt, ModelArg, console, interactive, outputs, user_errors
from dynavit.configured import load_configured, parse_config
from dynavit.deploy.derive import derive
from dynavit.deploy.export import FORMATS, check_format, write
from dynavit.deploy.folder import export_menu
from dynavit.deploy.predict import predict
from dynavit.deploy.slice import parameter_count, path_module
from dynavit.errors import DynavitError

app = typer.Typer()

FormatOpt = Annotated[str, typer.Option("--format", help=f"{' or '.join(FORMATS)}.")]
ExportStoreOpt = Annotated[Path | None, typer.Option("--store", help="Export every path of this sweep store's menu "
                                                                      "into the folder --out (with menu.json).")]


@app.command("export")
@user_errors
def export_cmd(model: ModelArg, out: Annotated[Path, typer.Option("--out", help="The file (one path) or, with "
                                                                               "--store, the folder.")],
               config: ConfigOpt = None, store: ExportStoreOpt = None, format: FormatOpt = "onnx",
               calibration: CalibOpt = None, device: DeviceOpt = "cpu") -> None:
    """One path (or a store's whole menu) as files with only the weights each path reads: ONNX or torch.export."""
    outputs((out, store is not None, "--out"))
    if store is not None:
        if config is not None:
            raise DynavitError("--store exports every path of the menu; leave out --config")
        menu_json = export_menu(store, out, model, format=format, device=device, progress=interactive())
        console.print(f"wrote {menu_json.parent} ({menu_json.name} and one file per path)")
        return
    dm = load_configured(model, config=config, calibration=calibration, device=device)
    module = path_module(dm)
    path = write(module, dm.example_input(2), out, check_format(format))
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; {parameter_count(module):,} of "
                  f"{parameter_count(dm.module):,} parameters)")


DeriveOutOpt = Annotated[Path, typer.Option("--out", help="Folder for the derived Hugging Face model.")]
DeriveConfigOpt = Annotated[str, typer.Option("--config", help="The path whose structure to keep (JSON, as "
                                                                "in stores): mlp_width, skip_blocks, decoder_width.")]


@app.command("derive")
@user_errors
def derive_cmd(model: ModelArg, config: DeriveConfigOpt, out: DeriveOutOpt, calibration: CalibOpt = None,
               half: Annotated[bool, typer.Option(help="fp16 weights on disk.")] = False) -> None:
    """A smaller model of the same family cut from one path's structure (calibrated units, compensation
    folded in), as a Hugging Face folder to fine-tune with ``dynavit train`` and serve as a variant."""
    outputs((out, True, "--out"))
    dm = load_configured(model, calibration=calibration)
    if dm.calibration is None:
        raise DynavitError("derive keeps the calibrated most important units: pass --calibration (written by "
                           "`dynavit calibrate`) or a model saved calibrated")
    folder = derive(dm, parse_config(config), out, half=half)
    console.print(f"wrote {folder}")


ImagesOpt = Annotated[Path, typer.Option("--images", help="Folder of images (any depth).")]
StorePickOpt = Annotated[Path | None, typer.Option(help="Sweep store whose menu --budget-ms picks from.")]
PredsOpt = Annotated[Path, typer.Option("--out", help="JSON lines, one record per image.")]
BudgetOpt = Annotated[float | None, typer.Option(help="Latency budget: the most accurate path of --store's menu "
                                                      "within it (re-timed here).")]
MasksOpt = Annotated[Path | None, typer.Option(help="Folder for segmentation masks (default: next to --out).")]
TopkOpt = Annotated[int, typer.Option(help="Labels per image.")]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]


@app.command("predict")
@user_errors
def predict_cmd(model: ModelArg, images: ImagesOpt,
                out: PredsOpt = Path("preds.jsonl"), config: ConfigOpt = None, budget_ms: BudgetOpt = None,
                store: StorePickOpt = None, masks: MasksOpt = None, topk: TopkOpt = 5, batch_size: BatchOpt = 16,
                calibration: CalibOpt = None) -> None:
    """Top-k labels (or a PNG mask) for every image in a folder; unreadable files are counted, not fatal."""
    outputs((out, False, "--out"), (masks, True, "--masks"))
    target = model if budget_ms is not None else load_configured(model, calibration=calibration)
    res = predict(target, images, config=None if config is None else parse_config(config), budget_ms=budget_ms,
                  store=store, topk=topk, batch_size=batch_size, masks=masks or out.with_name(out.stem + "-masks"),
                  progress=interactive())
    console.print(f"wrote {res.write_jsonl(out)}: {len(res)} images on {res.config!r}, {len(res.bad)} unreadable")
    for bad in res.bad[:10]:
        console.print(f"  unreadable: {bad}")
