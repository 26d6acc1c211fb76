"""``dynavit accel``: modelled accelerator energy and latency of a sweep's paths, and design exploration.

``dynavit accel MODEL --arch A ...`` is short for ``dynavit accel cost MODEL --arch A ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from dynavit.clikit import _user_errors, console
from dynavit.errors import DynavitError


class _CostByDefault(TyperGroup):
    """Routes ``accel MODEL ...`` to ``accel cost MODEL ...`` (MODEL is never a subcommand name)."""

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201 - click's signature
        if args and args[0] not in self.commands and (args[0] == "-" or not args[0].startswith("-")):
            args = ["cost", *args]
        return super().parse_args(ctx, args)


accel_app = typer.Typer(cls=_CostByDefault, no_args_is_help=True, help=(
    "Modelled accelerator cost of execution paths (ZigZag for conv/GEMM + a vector-unit model): "
    "`accel MODEL --arch A` costs a sweep store's configs; `accel dse MODEL` explores designs."))

ArchOpt = Annotated[list[str], typer.Option("--arch", help="Preset name or design YAML; repeat for several.")]
StoreOpt = Annotated[Path, typer.Option(help="Result store written by `dynavit sweep`.")]
SearchOpt = Annotated[str, typer.Option(help="Mapping search: fast (pruned) or full (ZigZag's default).")]
WorkersOpt = Annotated[int, typer.Option(help="Parallel ZigZag processes.")]
CacheOpt = Annotated[Path | None, typer.Option(help="Layer-cost cache (default: STORE.accel-cache).")]


def _archs(specs: list[str]):
    from dynavit.accel.arch import Arch

    if not specs:
        raise DynavitError("give at least one --arch (a preset name or a design YAML)")
    out = []
    for s in specs:
        out.append(Arch.from_yaml(s) if s.endswith((".yaml", ".yml")) or Path(s).is_file() else Arch.preset(s))
    return out


def _configs(spec: str | None):
    from dynavit.config import ExecConfig

    if spec is None:
        return None
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DynavitError(f"--configs must be a JSON list of configs or a .json file holding one ({e})") from None
    if not isinstance(items, list):
        raise DynavitError("--configs must be a JSON list of configs")
    return [ExecConfig.from_dict(c) for c in items]


@accel_app.command("cost")
@_user_errors
def cost_cmd(
    model: Annotated[str, typer.Argument(help="The store's model (folder or hub id); '-' uses the store's.")],
    arch: ArchOpt,
    store: StoreOpt = Path("results.db"),
    configs: Annotated[str | None, typer.Option(help="JSON list of configs (default: every stored config).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write accel.json here: per path, and per layer of each path.")
                   ] = None,
    search: SearchOpt = "fast",
    workers: WorkersOpt = 2,
    cache: CacheOpt = None,
) -> None:
    """Cost a sweep store's configs on one or several designs; write energy/latency back into the store."""
    from rich.table import Table

    from dynavit.accel.dse import cost_store

    archs = _archs(arch)
    res = cost_store(store, archs, model=None if model == "-" else model, configs=_configs(configs),
                     cache=cache, search=search, workers=workers, keep_layers=out is not None)
    for name, pairs in res.items():
        t = Table(title=f"{name}: modelled cost per image ({len(pairs)} configs; written to {store})")
        for col in ("config", "quality %", "GMACs", "energy uJ", "latency ms", "util", "MAC/buf/DRAM/vec uJ"):
            t.add_column(col, justify="left" if col == "config" else "right", overflow="fold")
        for row, c in sorted(pairs, key=lambda p: p[1].energy_uj):
            parts = "/".join(f"{v / 1e6:.1f}" for v in c.energy_pj.values())
            t.add_row(row.label or row.config.to_json(), f"{100 * row.quality:.1f}", f"{c.macs / 1e9:.3f}",
                      f"{c.energy_uj:.1f}", f"{c.latency_ms:.3f}", f"{c.utilization:.2f}", parts)
        console.print(t)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        dump = {name: [{"config": r.config.to_dict(), "label": r.label, "quality": r.quality, **c.summary(),
                        "layers": c.layers} for r, c in pairs] for name, pairs in res.items()}
        (out / "accel.json").write_text(json.dumps(dump, indent=1))
        console.print(f"wrote {out / 'accel.json'}")


@accel_app.command("dse")
@_user_errors
def dse_cmd(
    model: Annotated[str, typer.Argument(help="The store's model (folder or hub id); '-' uses the store's.")],
    store: StoreOpt = Path("results.db"),
    base: Annotated[str, typer.Option(help="Design to vary (preset or YAML).")] = "simba-v16",
    vector_sizes: Annotated[str, typer.Option(help="Comma-separated vector sizes V (peak MACs/cycle kept).")
                            ] = "8,16,32,64",
    global_buffers: Annotated[str, typer.Option(help="Extra global-buffer sizes (KiB) per V, comma-separated.")
                              ] = "",
    limit: Annotated[int | None, typer.Option(help="At most N configs: the default, the MAC front, then the configs it "
                                                   "cannot rule out (best first), then the rest.")] = None,
    granularity: Annotated[bool, typer.Option(help="Round channel knobs to V (measures new configs).")] = True,
    out: Annotated[Path, typer.Option(help="dse.json, dse.md, dse_fronts.png.")] = Path("out/accel-dse"),
    search: SearchOpt = "fast",
    workers: WorkersOpt = 2,
    cache: CacheOpt = None,
) -> None:
    """Energy-quality fronts of the store's paths on designs of different vector width and memory."""
    from dynavit.accel.dse import design_points, explore, markdown_table, write_exploration

    try:
        vs = [int(v) for v in vector_sizes.split(",") if v.strip()]
        gbs = [float(g) for g in global_buffers.split(",") if g.strip()]
    except ValueError:
        raise DynavitError("--vector-sizes and --global-buffers take comma-separated numbers") from None
    archs = design_points(_archs([base])[0], vs, gbs)
    ex = explore(store, archs, model=None if model == "-" else model, limit=limit, cache=cache, search=search,
                 workers=workers, vector_granularity=granularity)
    write_exploration(ex, out)
    console.print(markdown_table(ex))
    console.print(f"{len(archs)} designs, {ex.zigzag_searches} ZigZag searches, {ex.measured_configs} configs "
                  f"measured, {ex.seconds:.0f} s; wrote {out}/dse.md, dse.json, dse_fronts.png")
