"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

The sweep figures avoid pyplot, so they are never registered globally and cannot leak in a
long-running process. The operator-class chart is ``Profile.plot``'s own (pyplot, Agg), reused
so the report and ``dynavit profile`` draw the same chart.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dynavit.cost.profile import Profile
from dynavit.report.data import Curve
from dynavit.sweep.pareto import Front, cost_of
from dynavit.sweep.store import Row

_DPI = 110
_FRONT = "#1f77b4"
_PLAUSIBLE = "#ff7f0e"
_OTHER = "#9a9a9a"
_DEFAULT = "#d62728"


def png(fig: Figure) -> bytes:
    """Encode a figure as PNG bytes."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _quality_err(rows: list[Row]) -> tuple[list[float], list[list[float]]]:
    """Quality in % and asymmetric error bars; a missing CI draws no bar rather than failing."""
    ys, lo, hi = [], [], []
    for r in rows:
        q = 100.0 * r.quality
        ys.append(q)
        lo.append(_span(q, r.quality_lo, -1))
        hi.append(_span(q, r.quality_hi, +1))
    return ys, [lo, hi]


def _span(q: float, bound: float | None, sign: int) -> float:
    if bound is None or math.isnan(bound):
        return 0.0
    return max(0.0, sign * (100.0 * bound - q))


def quality_vs_cost(front: Front, *, xlabel: str, scale: float = 1.0, title: str, numbered: bool = False,
                    ylabel: str = "quality (%)") -> Figure:
    """Every config with its CI; the point-estimate front as a line, plausible optima and the default marked.

    ``numbered`` labels front points 1..k in cheapest-first order, matching the front table.
    """
    fig = Figure(figsize=(9, 5.4))
    ax = fig.subplots()
    rows = front.rows
    xs = [cost_of(r, front.cost) * scale for r in rows]
    ys, err = _quality_err(rows)
    on_front = set(front.front)
    plausible = set(front.plausible) - on_front
    groups = [
        ([i for i in range(len(rows)) if i not in on_front and i not in plausible], "other configs",
         dict(fmt="o", color=_OTHER, ms=5, alpha=0.7)),
        (sorted(plausible), "plausible optimum (not significantly dominated)",
         dict(fmt="D", mfc="none", color=_PLAUSIBLE, ms=7, mew=1.5)),
        (front.front, "Pareto front (point estimates)", dict(fmt="s", color=_FRONT, ms=7)),
    ]
    for idx, name, style in groups:
        if idx:
            ax.errorbar([xs[i] for i in idx], [ys[i] for i in idx],
                        yerr=[[err[0][i] for i in idx], [err[1][i] for i in idx]],
                        label=f"{name} ({len(idx)})", elinewidth=0.8, capsize=2, zorder=3, **style)
    if len(front.front) > 1:
        ax.plot([xs[i] for i in front.front], [ys[i] for i in front.front], "-", color=_FRONT, lw=1.5, zorder=2)
    if numbered:
        for n, i in enumerate(front.front, 1):
            ax.annotate(str(n), (xs[i], ys[i]), textcoords="offset points", xytext=(5, -11), fontsize=8,
                        color=_FRONT)
    d = next((i for i, r in enumerate(rows) if r.config.is_default), None)
    if d is not None:
        ax.plot([xs[d]], [ys[d]], "*", color=_DEFAULT, ms=16, mec="black", mew=0.6, zorder=4, label="default")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def resilience(curves: list[Curve], *, ylabel: str = "quality drop (points)") -> Figure:
    """One line per knob from the default (0, 0): how much quality each knob alone costs per MAC saved."""
    fig = Figure(figsize=(9, 5.4))
    ax = fig.subplots()
    cmap = _colors(len(curves))
    markers = "osD^vP*Xh<>"
    for k, (curve, color) in enumerate(zip(curves, cmap, strict=True)):
        pts = curve.points
        xs = [0.0] + [p.mac_reduction for p in pts]
        ys = [0.0] + [p.drop for p in pts]
        lo = [0.0] + [max(0.0, p.drop - p.drop_lo) for p in pts]
        hi = [0.0] + [max(0.0, p.drop_hi - p.drop) for p in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-" + markers[k % len(markers)], color=color, ms=6, capsize=2,
                    elinewidth=0.8, label=curve.knob)
        for p in pts:  # values only ("merge, 0.93, all"): the legend names the knob
            ax.annotate(_short(re.sub(r"\b\w+=", "", p.level)), (p.mac_reduction, p.drop),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("MACs saved vs default (%)")
    ax.set_ylabel(ylabel)
    ax.set_title("Per-knob resilience (paired 95% CI vs default; lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _colors(n: int) -> list[Any]:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _short(text: str, n: int = 18) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def profile_shares(profile: dict[str, Any], path: Path) -> Path:
    """FLOP share vs time share per operator class, drawn by ``Profile.plot`` from the stored JSON.

    Raises ``ValueError`` when the stored JSON does not match this version's ``Profile``.
    """
    return Profile.from_json(profile).plot(path)
