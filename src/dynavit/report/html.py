"""HTML of the report: one self-contained page (inline CSS, PNGs as data URIs, no network).

Every value from the store is escaped: labels and metadata are user-controlled text.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from dynavit.report.data import ReportData
from dynavit.sweep.store import Row

DASH = "–"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 16px 24px 48px; color: #1b1b1b; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 12px; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; }
th { background: #f4f6f8; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.default td { background: #fdecea; } tr.front td:first-child { border-left: 3px solid #1f77b4; }
details > summary { cursor: pointer; font-weight: 600; margin: 8px 0; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""

# Counts the images the browser actually decoded, so a headless check can tell a broken data URI.
_SCRIPT = """
window.addEventListener("load", function () {
  var all = Array.prototype.slice.call(document.images);
  var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesOk = String(ok.length);
  document.body.dataset.imagesTotal = String(all.length);
});
"""


@dataclass(frozen=True)
class Image:
    """A PNG that is both embedded in the page and written next to it as ``name``."""

    name: str
    data: bytes
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row], str]
    numeric: bool = True


# ---- formatting --------------------------------------------------------------------------------
def _ok(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def num(v: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    return f"{v * scale:{fmt}}" if _ok(v) else DASH


def with_ci(v: float | None, lo: float | None, hi: float | None, *, scale: float = 100.0, signed: bool = False) -> str:
    """``81.2 [80.1, 82.3]`` (or signed, for deltas); the interval is left out when unknown."""
    if not _ok(v):
        return DASH
    fmt = "+.2f" if signed else ".2f"
    text = f"{v * scale:{fmt}}"
    if _ok(lo) and _ok(hi):
        text += f" [{lo * scale:{fmt}}, {hi * scale:{fmt}}]"
    return text


def date(ts: float | str | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(ts)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DASH


# ---- blocks ------------------------------------------------------------------------------------
def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def figure(img: Image) -> str:
    b64 = base64.b64encode(img.data).decode("ascii")
    cap = f"{escape(img.caption)} " if img.caption else ""
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{escape(img.alt)}">'
            f'<figcaption>{cap}(<a href="{escape(img.name)}">{escape(img.name)}</a>)</figcaption></figure>')


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def table(rows: Sequence[Row], columns: Sequence[Column], *, anchor: str,
          row_class: Callable[[Row], str] = lambda r: "") -> str:
    """A table whose rows carry their config label in ``data-label`` (for tests and scripts)."""
    head = "".join(f"<th>{escape(c.header)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = "".join(f'<td class="num">{escape(c.cell(r))}</td>' if c.numeric else f"<td>{escape(c.cell(r))}</td>"
                        for c in columns)
        cls = row_class(r)
        cls_attr = f' class="{cls}"' if cls else ""
        body.append(f'<tr{cls_attr} data-label="{escape(r.label or DASH)}">{cells}</tr>')
    return f'<table id="{escape(anchor)}"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body) + \
        "\n</tbody></table>"


def columns(data: ReportData, *, full: bool = False) -> list[Column]:
    """The front table's columns; ``full`` adds what matters only when scanning every row."""
    cols = [
        Column("config", lambda r: r.label or ("default" if r.config.is_default else r.config.to_json()), False),
        Column(f"{data.meta.get('metric', 'quality')} % [95% CI]", lambda r: with_ci(r.quality, r.quality_lo,
                                                                                     r.quality_hi)),
        Column("Δ vs default, pts [paired 95% CI]", lambda r: with_ci(r.delta, r.delta_lo, r.delta_hi, signed=True)),
        Column("GMACs", lambda r: num(r.macs, ".3f", 1e-9)),
        Column("MACs saved %", lambda r: num(data.mac_reduction(r), ".1f")),
        Column("latency p50 ms", lambda r: num(r.latency_p50_ms)),
        Column("latency p95 ms", lambda r: num(r.latency_p95_ms)),
        Column("images/s", lambda r: num(r.images_per_s, ".1f")),
    ]
    if full:
        macs = data.fronts.get("macs")
        front = {macs.rows[i].id for i in macs.front} if macs else set()
        plausible = {macs.rows[i].id for i in macs.plausible} if macs else set()
        cols += [
            Column("batch", lambda r: str(r.batch) if r.batch is not None else DASH),
            Column("batch p50 ms", lambda r: num(r.batch_p50_ms)),
            Column("energy mJ", lambda r: num(r.energy_mj)),
            Column("MAC front", lambda r: "front" if r.id in front else ("plausible" if r.id in plausible else ""),
                   False),
            Column("strategy", lambda r: r.strategy or "", False),
            Column("device", lambda r: r.device or "", False),
        ]
    return cols


def header(data: ReportData, generated: float) -> str:
    """Who, what and where: enough to tell two reports apart and to reproduce one."""
    meta, rows = data.meta, data.rows
    devices = sorted({r.device for r in rows if r.device})
    versions: dict[str, set[str]] = {}
    for r in rows:
        for k, v in (r.versions or {}).items():
            versions.setdefault(k, set()).add(str(v))
    items = [
        ("model", meta.get("model", DASH)),
        ("model fingerprint", meta.get("model_fingerprint", DASH)),
        ("calibration", meta.get("calibration", DASH)),
        ("dataset", meta.get("dataset_fingerprint", DASH)),
        ("task / metric", f"{meta.get('task', DASH)} / {meta.get('metric', DASH)}"),
        ("device(s)", ", ".join(devices) or DASH),
        ("configs", f"{len(rows)}" + ("" if data.default else " (no default config measured)")),
        ("store", f"{data.path} (created {date(meta.get('created'))}, last result "
                  f"{date(max((r.created for r in rows if r.created), default=None))})"),
        ("report generated", date(generated)),
        ("versions", "; ".join(f"{k} {' / '.join(sorted(v))}" for k, v in sorted(versions.items())) or DASH),
    ]
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items)
    proto = json.dumps(data.protocol, indent=2, sort_keys=True) if data.protocol else meta.get("protocol", "")
    title = f"dynavit sweep report: {meta.get('model', data.path.name)}"
    warn = "".join(f'<p class="note warning">warning: {escape(w)}</p>' for w in data.warnings)
    return (f"<h1>{escape(title)}</h1>\n<dl class=\"meta\">{dl}</dl>\n{warn}"
            f"<details><summary>evaluation protocol</summary><pre>{escape(proto)}</pre></details>")


def page(title: str, blocks: Sequence[str]) -> str:
    body = "\n".join(blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f'<body data-images-ok="pending" data-images-total="pending">\n{body}\n'
            f"<script>{_SCRIPT}</script>\n</body>\n</html>\n")
