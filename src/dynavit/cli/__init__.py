"""The ``dynavit`` command: one module per group of commands, each command a thin layer over the library.

Every command turns a :class:`DynavitError` (bad user input), and the root command every usage
error (unknown option, bad number, missing argument), into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback (see ``dynavit.cli.kit``).
"""

from __future__ import annotations

import typer

from dynavit.cli import accel, demo, deploy, inspect, runtime, sweep, train
from dynavit.cli.kit import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    help="Run-time adaptive inference of vision transformers: profile, evaluate, sweep, serve, cost on accelerators.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (inspect, sweep, runtime, deploy, train, demo):
    app.add_typer(group.app)
app.add_typer(accel.app, name="accel")


def main() -> None:  # pragma: no cover - console entry point
    app()


__all__ = ["app", "main"]
