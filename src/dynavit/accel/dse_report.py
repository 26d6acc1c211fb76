"""The design-space exploration's outputs: its table, its energy-quality fronts, its files."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from dynavit.accel.dse import Exploration
from dynavit.errors import DynavitError


def write_exploration(ex: Exploration, out: str | Path) -> Path:
    """``dse.json``, ``dse.md`` (the table) and ``dse_fronts.png`` in ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynavitError(f"cannot write to {out}: {e.strerror or e}") from None
    (out / "dse.json").write_text(json.dumps(ex.to_json(), indent=1))
    (out / "dse.md").write_text(markdown_table(ex))
    plot_fronts(ex).savefig(out / "dse_fronts.png", dpi=120)
    return out


def markdown_table(ex: Exploration) -> str:
    sums = ex.summaries()
    heads = ["design", "V", "GB KiB", "default energy uJ", "default latency ms", "util"]
    for d in ex.drops:
        heads += [f"saving @<= {100 * d:g} pt (energy / latency)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for s in sums:  # Δ: on the scoring images when the exploration has a split (the JSON says which)
        cells = [s["design"], str(s["vector_size"]), f"{s['global_buffer_kib']:g}", f"{s['default_energy_uj']:.1f}",
                 f"{s['default_latency_ms']:.3f}", f"{s['default_utilization']:.2f}"]
        for d in ex.drops:
            a = s["at_drop"][f"{100 * d:g}"]
            ci = f" [{a['delta_ci_pts'][0]:+.1f}, {a['delta_ci_pts'][1]:+.1f}]" if "delta_ci_pts" in a else ""
            cells.append(f"{100 * a['energy_saving']:.1f}% / {100 * a['latency_saving']:.1f}% "
                         f"(Δ {-a['drop_pts']:+.1f}{ci} pt, {a['energy_uj']:.1f} uJ)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fronts(ex: Exploration) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    ax_abs, ax_rel = fig.subplots(1, 2)
    for d in ex.designs:
        f = d.front()
        e0 = d.costs[d.default()].energy_uj
        q = [100 * d.rows[i].quality for i in f]
        ax_abs.step([d.costs[i].energy_uj for i in f], q, where="post", marker="o", ms=3, label=d.arch.name)
        ax_rel.step([d.costs[i].energy_uj / e0 for i in f], q, where="post", marker="o", ms=3, label=d.arch.name)
    ax_abs.set_xlabel("modelled energy per image (uJ)")
    ax_rel.set_xlabel("energy relative to the design's default path")
    for ax in (ax_abs, ax_rel):
        ax.set_ylabel(f"{ex.metric} (%)")
        ax.grid(alpha=0.3)
    ax_abs.legend(fontsize=8)
    fig.suptitle("energy-quality Pareto fronts per accelerator design")
    fig.tight_layout()
    return fig
