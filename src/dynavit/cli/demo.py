"""``dynavit demo``: the end-to-end tour on the bundled models and images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynavit.cli.kit import LimitOpt, console, outputs, user_errors
from dynavit.demo import run_demo

app = typer.Typer()


@app.command("demo")
@user_errors
def demo_cmd(out: Annotated[Path, typer.Option(help="Where tables, JSON and charts go.")] = Path("out"),
             limit: LimitOpt = None,
             data: Annotated[Path | None, typer.Option(help="Labelled images for the evaluation step.")] = None,
             ) -> None:
    """Profile DeiT-tiny and SegFormer-B2, evaluate DeiT-tiny on ImageNet samples, write to OUT."""
    outputs((out, True, "--out"))
    run_demo(out, limit=limit, console=console, data=data)
