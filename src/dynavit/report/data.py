"""What the report shows, computed from a result store without drawing anything.

Kept apart from plotting and HTML so the selection rules (which rows form a knob's
resilience curve, which costs get a front) can be tested and reused on their own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.sweep import stats
from dynavit.sweep.pareto import DRIFT_FACTOR, Front, cost_of, latency_warnings, pareto
from dynavit.sweep.store import ResultStore, Row

#: Costs that get a quality-vs-cost plot, in page order (energy only when measured).
PLOT_COSTS = ("macs", "latency_p50_ms", "energy_mj")

_KNOB = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:=(.*)|\((.*)\))\s*$")


@dataclass(frozen=True)
class Point:
    """One level of a knob on its resilience curve, relative to the default config."""

    row: Row
    level: str  # the level as the label spells it ("192", "method=merge, keep=0.93")
    mac_reduction: float  # percent of the default's MACs saved
    drop: float  # quality lost, points (positive = worse than default)
    drop_lo: float
    drop_hi: float


@dataclass(frozen=True)
class Curve:
    knob: str
    points: list[Point]  # mildest (fewest MACs saved) first


@dataclass
class ReportData:
    path: Path
    meta: dict[str, str]
    protocol: dict[str, Any]
    rows: list[Row]  # every stored row, cheapest (MACs) first
    default: Row | None
    fronts: dict[str, Front]  # cost -> front; only costs that at least one row has
    curves: list[Curve]
    profile: dict[str, Any] | None  # Profile.to_json() of the default path
    n_boot: int
    seed: int

    @property
    def task(self) -> str:
        return self.meta.get("task", "classification")

    @property
    def warnings(self) -> list[str]:
        """What makes the page's latencies untrustworthy: timings that drifted while measured
        (``pareto.latency_warnings``), and a default path whose stored latency disagrees with the
        profile of the same path beside it (one was measured on a loaded machine)."""
        out = latency_warnings(self.rows)
        prof = (self.profile or {}).get("latency_ms")
        stored = self.default.latency_p50_ms if self.default is not None else None
        if prof and stored and max(prof / stored, stored / prof) > DRIFT_FACTOR:
            out.append(f"the default path's stored latency (p50 {stored:.1f} ms) and its profile ({prof:.1f} ms) "
                       f"disagree by {max(prof / stored, stored / prof):.1f}x (> {DRIFT_FACTOR}x): the machine was "
                       "loaded while one of them was measured; re-measure before trusting the latency columns")
        return out

    def mac_reduction(self, row: Row) -> float | None:
        """Percent of the default config's MACs that ``row`` saves (None without a default)."""
        if self.default is None or not self.default.macs or row.macs is None:
            return None
        return 100.0 * (1.0 - row.macs / self.default.macs)


def knob_of(row: Row) -> tuple[str, str] | None:
    """(knob, level) when ``row`` differs from the default in exactly one knob, else None.

    The sweep's label names knobs ("resolution=192; tokens(keep=0.9)"); a row without a
    label falls back to its config, where one changed field counts as one knob.
    """
    if row.config.is_default:
        return None
    label = (row.label or "").strip()
    if label and label != "default":
        parts = [p for p in label.split(";") if p.strip()]
        m = _KNOB.match(parts[0]) if len(parts) == 1 else None
        if m is None:
            return None
        return m.group(1), (m.group(2) if m.group(2) is not None else m.group(3)).strip()
    changed = row.config.to_dict()
    if len(changed) != 1:
        return None
    (name, value), = changed.items()
    return name, str(value)


def _paired_drop(row: Row, default: Row, task: str, n_boot: int, seed: int) -> tuple[float, float, float] | None:
    """Quality drop in points with its paired CI; recomputed when the store lacks the delta."""
    d, lo, hi = row.delta, row.delta_lo, row.delta_hi
    if d is None:
        if row.per_image is None or default.per_image is None or len(row.per_image) != len(default.per_image):
            return None
        d, lo, hi = stats.paired_delta(row.per_image, default.per_image, task, n_boot, seed)
    lo = d if lo is None or math.isnan(lo) else lo
    hi = d if hi is None or math.isnan(hi) else hi
    return -100.0 * d, -100.0 * hi, -100.0 * lo


def resilience_curves(rows: list[Row], default: Row | None, task: str, n_boot: int, seed: int) -> list[Curve]:
    """Per knob, the rows that change only that knob: the knob's cost/quality trade-off alone."""
    if default is None or not default.macs:
        return []
    by_knob: dict[str, list[Point]] = {}
    for row in rows:
        kl = knob_of(row)
        if kl is None or row.macs is None:
            continue
        drop = _paired_drop(row, default, task, n_boot, seed)
        if drop is None:
            continue
        red = 100.0 * (1.0 - row.macs / default.macs)
        by_knob.setdefault(kl[0], []).append(Point(row, kl[1], red, *drop))
    return [Curve(k, sorted(pts, key=lambda p: (p.mac_reduction, p.level))) for k, pts in sorted(by_knob.items())]


def _json_or_empty(text: str | None) -> dict[str, Any]:
    try:
        v = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return v if isinstance(v, dict) else {}


def load(store_path: str | Path, n_boot: int | None = None) -> ReportData:
    """Read a store and compute fronts and curves; an empty store is a user error."""
    path = Path(store_path)
    with ResultStore(path, readonly=True) as store:
        meta = store.meta
        rows = store.rows()
        profiles = store.profiles()
    if not rows:
        raise DynavitError(f"{path}: store has no results yet (run `dynavit sweep` with --store {path} first)")
    protocol = _json_or_empty(meta.get("protocol"))
    n_boot = int(n_boot if n_boot is not None else protocol.get("n_boot", 1000))
    seed = int(protocol.get("seed", 0))
    task = meta.get("task", "classification")
    rows.sort(key=lambda r: (math.inf if r.macs is None else r.macs, -(r.quality or 0.0)))
    default = next((r for r in rows if r.config.is_default), None)
    designs = sorted({d for r in rows for d in r.accel})  # modelled accelerator energy, per design
    costs = [*PLOT_COSTS, *(f"accel_energy_uj:{d}" for d in designs)]
    fronts = {c: pareto(rows, c, n_boot=n_boot, seed=seed) for c in costs
              if any(cost_of(r, c) is not None and r.quality is not None for r in rows)}
    return ReportData(
        path=path, meta=meta, protocol=protocol, rows=rows, default=default, fronts=fronts,
        curves=resilience_curves(rows, default, task, n_boot, seed), profile=profiles.get(ExecConfig()),
        n_boot=n_boot, seed=seed,
    )
