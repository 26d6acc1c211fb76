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
from rich.markup import escape
from transformers.utils import logging as hf_logging
from typer.core import TyperGroup

from dynavit.errors import DynavitError, check_writable

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
MovedDataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Where the sweep's images are now, if they moved since the sweep (default: where the store "
                   "says they were).")]


def user_errors(fn: F) -> F:
    """Run a command; a DynavitError becomes one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hf_logging.disable_progress_bar()  # per-tensor loading bars drown the CLI's own output
        try:
            return fn(*args, **kwargs)
        except DynavitError as e:
            error_line(str(e))
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def error_line(message: str) -> None:
    """``error: message`` on stderr, one line, printed as written (``[timm]`` is no markup)."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


_UsageError = typer.BadParameter.__bases__[0]  # click's UsageError, as typer vendors it


class OneLineErrors(TyperGroup):
    """The root command: a usage error (bad option, missing argument) is one line, exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's exceptions, as typer vendors them
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare command: its help is already shown
                sys.exit(e.exit_code)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            error_line(e.format_message() + where)
            sys.exit(2 if isinstance(e, _UsageError) else e.exit_code)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def outputs(*checks: tuple[Path | None, bool, str]) -> None:
    """Check every (path, is_folder, option) a command will write, before the command does any work."""
    for path, folder, option in checks:
        if path is not None:
            check_writable(path, folder=folder, option=option)


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
