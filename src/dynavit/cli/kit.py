"""What every ``dynavit`` command shares: the consoles, the user-error wrapper and the common options.

Every command turns a :class:`DynavitError` (bad user input) into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from transformers.utils import logging as hf_logging

from dynavit.errors import DynavitError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Options and arguments that several commands declare the same way.
ModelArg = Annotated[str, typer.Argument(
    help="Hugging Face hub id, local model folder, timm:<name>, or config:<preset>.")]
StoreArg = Annotated[Path, typer.Argument(help="Result store written by `dynavit sweep`.")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="Execution path: ExecConfig JSON, e.g. '{\"mlp_width\": 0.5}', or a .json file.")]
CalibOpt = Annotated[Path | None, typer.Option("--calibration", help="Folder written by `dynavit calibrate`.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
LayoutOpt = Annotated[str | None, typer.Option(help="Force a dataset layout instead of detecting it.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use N images spread evenly over the dataset.")]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Skip and count unreadable images.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")]


def user_errors(fn: F) -> F:
    """Run a command; a DynavitError becomes one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hf_logging.disable_progress_bar()  # per-tensor loading bars drown the CLI's own output
        try:
            return fn(*args, **kwargs)
        except DynavitError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def interactive() -> bool:
    """Progress bars only when a person watches stderr."""
    return sys.stderr.isatty()


def print_wide(renderable: Any, width: int) -> None:
    """Print a wide table; piped output gets ``width`` columns instead of folding at 80."""
    (console if console.is_terminal else Console(width=width)).print(renderable)


def floats(text: str, option: str) -> list[float]:
    """Parse a comma-separated list of numbers given to ``option``."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DynavitError(f"{option} takes comma-separated numbers, got {text!r}") from None


def fmt(v: float | None, places: int = 1) -> str:
    """A table cell: empty for a missing value."""
    return "" if v is None else f"{v:.{places}f}"
