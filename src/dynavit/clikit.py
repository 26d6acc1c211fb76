"""What every ``dynavit`` command shares: the consoles and the user-error wrapper.

Every command turns a :class:`DynavitError` (bad user input) into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from dynavit.errors import DynavitError

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
