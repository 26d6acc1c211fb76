"""``dynavit accel``: modelled accelerator energy and latency of a sweep's paths, and design exploration.

``dynavit accel MODEL --arch A ...`` is short for ``dynavit accel cost MODEL --arch A ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from dynavit.accel.arch import Arch
from dynavit.accel.dse import cost_store, design_points, explore
from dynavit.accel.dse_report import markdown_table, write_exploration
from dynavit.cli.kit import MovedDataOpt, console, outputs, user_errors
from dynavit.configured import parse_configs
from dynavit.errors import DynavitError
from dynavit.sweep.store import images_at


class _CostByDefault(TyperGroup):
    """Routes ``accel MODEL ...`` to ``accel cost MODEL ...`` (MODEL is never a subcommand name)."""

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201 - click's signature
        if args and args[0] not in self.commands and (args[0] == "-" or not args[0].startswith("-")):
            args = ["cost", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_CostByDefault, no_args_is_help=True, help=(
    "Modelled accelerator cost of execution paths (ZigZag for conv/GEMM + a vector-unit model): "
    "`accel MODEL --arch A` costs a sweep store's configs; `accel dse MODEL` explores designs."))

ModelArg = Annotated[str, typer.Argument(help="The store's model (folder or hub id); '-' uses the store's.")]
ArchOpt = Annotated[list[str], typer.Option("--arch", help="Preset name or design YAML; repeat for several.")]
StoreOpt = Annotated[Path, typer.Option(help="Result store written by `dynavit sweep`.")]
SearchOpt = Annotated[str, typer.Option(help="Mapping search: fast (pruned) or full (ZigZag's default).")]
WorkersOpt = Annotated[int, typer.Option(help="Parallel ZigZag processes.")]
CacheOpt = Annotated[Path | None, typer.Option(help="Layer-cost cache (default: STORE.accel-cache).")]
ConfigsOpt = Annotated[str | None, typer.Option(help="JSON list of configs (default: every stored config).")]
CostOutOpt = Annotated[Path | None, typer.Option(help="Write accel.json here: per path, and per layer of each path.")]
BaseOpt = Annotated[str, typer.Option(help="Design to vary (preset or YAML).")]
VectorOpt = Annotated[str, typer.Option(help="Comma-separated vector sizes V (peak MACs/cycle kept).")]
BufferOpt = Annotated[str, typer.Option(help="Extra global-buffer sizes (KiB) per V, comma-separated.")]
DseLimitOpt = Annotated[int | None, typer.Option(help="At most N configs: the default, the MAC front, then the "
                                                      "configs it cannot rule out (best first), then the rest.")]
GranularityOpt = Annotated[bool, typer.Option(help="Round channel knobs to V (measures new configs).")]
DseOutOpt = Annotated[Path, typer.Option(help="dse.json, dse.md, dse_fronts.png.")]
SelectOpt = Annotated[float, typer.Option(help="Share of the store's images that choose each design's path at a drop; "
                                               "the rest report it. 1: choose and report on all (in-sample).")]


def _archs(specs: list[str]) -> list[Arch]:
    """``--arch`` values: design YAML files or preset names."""
    if not specs:
        raise DynavitError("give at least one --arch (a preset name or a design YAML)")
    return [Arch.from_yaml(s) if s.endswith((".yaml", ".yml")) or Path(s).is_file() else Arch.preset(s)
            for s in specs]


@app.command("cost")
@user_errors
def cost_cmd(model: ModelArg, arch: ArchOpt, store: StoreOpt = Path("results.db"), configs: ConfigsOpt = None,
             out: CostOutOpt = None, search: SearchOpt = "fast", workers: WorkersOpt = 2, cache: CacheOpt = None
             ) -> None:
    """Cost a sweep store's configs on one or several designs; write energy/latency back into the store."""
    outputs((out, True, "--out"))
    res = cost_store(store, _archs(arch), model=None if model == "-" else model,
                     configs=None if configs is None else parse_configs(configs), cache=cache, search=search,
                     workers=workers, keep_layers=out is not None)
    for name, pairs in res.items():
        _print_costs(name, pairs, store)
    if out is not None:
        dump = {name: [{"config": r.config.to_dict(), "label": r.label, "quality": r.quality, **c.summary(),
                        "layers": c.layers} for r, c in pairs] for name, pairs in res.items()}
        (out / "accel.json").write_text(json.dumps(dump, indent=1))
        console.print(f"wrote {out / 'accel.json'}")


def _print_costs(name: str, pairs: list[tuple[Any, Any]], store: Path) -> None:
    """One design's table: the configs by modelled energy, cheapest first."""
    t = Table(title=f"{name}: modelled cost per image ({len(pairs)} configs; written to {store})")
    for col in ("config", "quality %", "GMACs", "energy uJ", "latency ms", "util", "MAC/buf/DRAM/vec uJ"):
        t.add_column(col, justify="left" if col == "config" else "right", overflow="fold")
    for row, c in sorted(pairs, key=lambda p: p[1].energy_uj):
        parts = "/".join(f"{v / 1e6:.1f}" for v in c.energy_pj.values())
        t.add_row(row.label or row.config.to_json(), f"{100 * row.quality:.1f}", f"{c.macs / 1e9:.3f}",
                  f"{c.energy_uj:.1f}", f"{c.latency_ms:.3f}", f"{c.utilization:.2f}", parts)
    console.print(t)


@app.command("dse")
@user_errors
def dse_cmd(model: ModelArg, store: StoreOpt = Path("results.db"), base: BaseOpt = "simba-v16",
            vector_sizes: VectorOpt = "8,16,32,64", global_buffers: BufferOpt = "", limit: DseLimitOpt = None,
            granularity: GranularityOpt = True, out: DseOutOpt = Path("out/accel-dse"), search: SearchOpt = "fast",
            workers: WorkersOpt = 2, cache: CacheOpt = None, select_share: SelectOpt = 0.5,
            data: MovedDataOpt = None) -> None:
    """Energy-quality fronts of the store's paths on designs of different vector width and memory."""
    outputs((out, True, "--out"))
    if not 0 < select_share <= 1:
        raise DynavitError(f"--select-share must be in (0, 1], got {select_share}")
    try:
        vs = [int(v) for v in vector_sizes.split(",") if v.strip()]
        gbs = [float(g) for g in global_buffers.split(",") if g.strip()]
    except ValueError:
        raise DynavitError("--vector-sizes and --global-buffers take comma-separated numbers") from None
    archs = design_points(_archs([base])[0], vs, gbs)
    with images_at(data):  # new configs are measured on the sweep's images
        ex = explore(store, archs, model=None if model == "-" else model, limit=limit, cache=cache, search=search,
                     workers=workers, vector_granularity=granularity,
                     select_share=None if select_share == 1 else select_share)
    write_exploration(ex, out)
    console.print(markdown_table(ex))
    console.print(f"{len(archs)} designs, {ex.zigzag_searches} ZigZag searches, {ex.measured_configs} configs "
                  f"measured, {ex.seconds:.0f} s; wrote {out}/dse.md, dse.json, dse_fronts.png")
