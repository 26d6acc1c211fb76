"""``dynavit report``: a sweep's result store as one self-contained HTML page.

The page (``index.html``) embeds every chart as a data URI so it can be mailed or archived as
one file; the same PNGs are written next to it for slides and papers. Sections: the
experiment header, quality vs MACs / latency / energy with Pareto fronts, per-knob resilience
curves, FLOP share vs time share of the default path, and the front and full tables.
"""

from __future__ import annotations

import time
from pathlib import Path

from matplotlib.figure import Figure

from dynavit.errors import DynavitError
from dynavit.report import html, plots
from dynavit.report.data import ReportData, knob_of, load
from dynavit.sweep.pareto import COSTS

__all__ = ["write_report", "load", "knob_of", "ReportData"]

_AXES = {  # cost -> (x label, scale to display units)
    "macs": ("GMACs per image (batch 1)", 1e-9),
    "latency_p50_ms": (COSTS["latency_p50_ms"], 1.0),
    "energy_mj": (COSTS["energy_mj"], 1.0),
}
_TITLES = {"macs": "MACs", "latency_p50_ms": "latency (batch 1, p50)", "energy_mj": "energy"}
_PNGS = (*(f"quality_{c}.png" for c in _AXES), "resilience.png", "profile.png")


def write_report(store_path: str | Path, out_dir: str | Path, *, n_boot: int | None = None) -> Path:
    """Write ``out_dir/index.html`` (and its PNGs) for the store at ``store_path``; returns the page's path.

    ``n_boot``: bootstrap replicates for the "plausible" sets (default: the sweep's protocol).
    Raises ``DynavitError`` for a missing, foreign or empty store.
    """
    data = load(store_path, n_boot)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynavitError(f"cannot write the report to {out}: {e.strerror or e}") from None
    for stale in [*(out / n for n in _PNGS), *out.glob("quality_accel_*.png")]:  # none the store lost may linger
        stale.unlink(missing_ok=True)
    blocks = [
        html.header(data, time.time()),
        *(_tradeoff(data, cost, out) for cost in _AXES),
        *(_tradeoff(data, cost, out) for cost in data.fronts if cost.startswith("accel_")),
        _resilience(data, out),
        _profile(data, out),
        *_tables(data),
    ]
    index = out / "index.html"
    index.write_text(html.page(f"dynavit report: {data.meta.get('model', data.path.name)}", blocks), encoding="utf-8")
    return index


def _image(out: Path, name: str, content: Figure | bytes, alt: str, caption: str = "") -> html.Image:
    data = plots.png(content) if isinstance(content, Figure) else content
    (out / name).write_bytes(data)
    return html.Image(name, data, alt, caption)


def _axis(cost: str) -> tuple[str, tuple[str, float]]:
    """(title, (x label, scale)) of a cost; accelerator costs (``dynavit accel``) are per design."""
    if cost.startswith("accel_"):
        design = cost.partition(":")[2]
        return f"modelled accelerator energy ({design})", (f"modelled energy on {design} (uJ per image)", 1.0)
    return _TITLES[cost], _AXES[cost]


def _tradeoff(data: ReportData, cost: str, out: Path) -> str:
    """Quality vs one cost; a cost nobody measured becomes a note, not an empty chart."""
    name, (xlabel, scale) = _axis(cost)
    title = f"Quality vs {name}"
    anchor = f"quality-{cost.replace(':', '-')}"
    front = data.fronts.get(cost)
    if front is None:
        if cost == "energy_mj":
            return html.section(title, html.note("Energy was not measured (it needs an NVIDIA GPU and "
                                                 "nvidia-ml-py); energy plot skipped."), anchor)
        why = ("the sweep ran without latency measurement" if cost.startswith("latency")
               else "every stored row lacks its MAC count")
        return html.section(title, html.note(f"No config has a {name} measurement ({why}); "
                                             f"{name} plot skipped."), anchor)
    metric = data.meta.get("metric", "quality")
    fig = plots.quality_vs_cost(front, xlabel=xlabel, scale=scale, numbered=cost == "macs",
                                ylabel=f"{metric} (%)", title=f"{metric} vs {name}")
    n_plausible = len(set(front.plausible) - set(front.front))
    caption = (f"{len(front.rows)} configs; {len(front.front)} on the front, {n_plausible} more not significantly "
               f"dominated (paired bootstrap, {data.n_boot} replicates). Error bars: 95% CI.")
    if cost == "macs":
        caption += " Numbers match the front table."
    png_name = f"quality_{cost.replace(':', '_')}.png"
    body = html.figure(_image(out, png_name, fig, f"{metric} vs {name}", caption))
    missing = len(data.rows) - len(front.rows)
    if missing:
        body += html.note(f"{missing} config(s) without a {name} measurement are not shown.")
    return html.section(title, body, anchor)


def _resilience(data: ReportData, out: Path) -> str:
    title, anchor = "Per-knob resilience", "resilience"
    if data.default is None:
        return html.section(title, html.note("The default config is not in the store, so there is nothing to "
                                             "measure drops against; resilience curves skipped."), anchor)
    if not data.curves:
        return html.section(title, html.note("No config differs from the default in exactly one knob (the greedy "
                                             "and grid strategies measure these); resilience curves skipped."),
                            anchor)
    n = sum(len(c.points) for c in data.curves)
    caption = (f"{len(data.curves)} knobs, {n} single-knob configs: quality drop (paired difference to the default, "
               "95% CI) vs MACs saved.")
    img = _image(out, "resilience.png", plots.resilience(data.curves), "per-knob resilience curves", caption)
    return html.section(title, html.figure(img), anchor)


def _profile(data: ReportData, out: Path) -> str:
    title, anchor = "FLOP share vs time share (default path)", "profile"
    if data.profile is None:
        return html.section(title, html.note("No operator-class profile of the default path is stored (the sweep "
                                             "records one when it measures latency); section skipped."), anchor)
    try:
        path = plots.profile_shares(data.profile, out / "profile.png")
    except ValueError as e:
        return html.section(title, html.note(f"{e}; section skipped."), anchor)
    caption = "Share of FLOPs vs share of measured time per operator class: FLOPs do not predict time."
    img = html.Image(path.name, path.read_bytes(), "FLOP share vs time share per operator class", caption)
    return html.section(title, html.figure(img), anchor)


def _tables(data: ReportData) -> tuple[str, str]:
    """The MAC front as a menu (numbered like its plot), then every row, folded away."""
    front = data.fronts.get("macs")
    if front is None:
        body = html.note("No config has MACs; no front table.")
    else:
        rank = {front.rows[i].id: n for n, i in enumerate(front.front, 1)}
        cols = [html.Column("#", lambda r: str(rank[r.id])), *html.columns(data)]
        body = html.table(front.menu(), cols, anchor="front",
                          row_class=lambda r: "default" if r.config.is_default else "")
    on_front = {r.id for r in front.menu()} if front else set()
    all_rows = html.table(data.rows, html.columns(data, full=True), anchor="all-rows",
                          row_class=lambda r: "default" if r.config.is_default else "front" if r.id in on_front else "")
    folded = f"<details><summary>Show all {len(data.rows)} configs (cheapest first)</summary>\n{all_rows}\n</details>"
    return html.section("Pareto front by MACs", body, "front-table"), html.section("All configs", folded, "all")
