"""Checks of the ZigZag bridge (``dynavit.accel.zigzag``), two subcommands:

``reproduce``: ZigZag's own example (ResNet-18 on its TPU-like design, the numbers its test
``tests/main/test_origin/test_tpu_like.py`` expects), costed layer by layer through the
bridge (ONNX -> MacOp -> ZigZag layer) and compared with ``zigzag.api``'s whole-network call:

    .venv/bin/python benchmarks/accel_resnet18.py reproduce [--search full]

``search``: how far the "fast" mapping search is from ZigZag's default ("full") on typical
DeiT-tiny layers, on every vector-size preset (time per layer, energy, cycles):

    .venv/bin/python benchmarks/accel_resnet18.py search [--designs simba-v8,simba-v16,...]

Both print Markdown and write the raw JSON to benchmarks/results/<tag>.json (``--out DIR``:
a copy there too); ``--doc`` also writes the Markdown table to benchmarks/results/<tag>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import zigzag
from docsection import write_json, write_section

from dynavit.accel.arch import Arch
from dynavit.accel.layers import MacOp
from dynavit.accel.zigzag import cost_mac_op, describe
from dynavit.accel.zigzag_onnx import reproduce_zigzag_example

ZZ = Path(zigzag.__file__).parent
EXPECTED = (1871436380.6559997, 3865041.0)  # ZigZag's test_tpu_like.py, resnet18.onnx

VIT_LAYERS = {  # DeiT-tiny: 197 tokens, width 192, 3 heads of 64, MLP 768
    "patch embed": MacOp("conv", B=1, K=192, C=3, OY=14, OX=14, FY=16, FX=16, SY=16, SX=16),
    "qkv": MacOp("linear", B=197, K=576, C=192),
    "q k^T": MacOp("attention", B=197, K=197, C=64, G=3),
    "attn v": MacOp("attention", B=197, K=64, C=197, G=3),
    "proj": MacOp("linear", B=197, K=192, C=192),
    "fc1": MacOp("linear", B=197, K=768, C=192),
    "fc2": MacOp("linear", B=197, K=192, C=768),
    "fc1 half": MacOp("linear", B=197, K=384, C=192),
    "q k^T 2 heads": MacOp("attention", B=197, K=197, C=64, G=2),
    "head": MacOp("linear", B=1, K=1000, C=192),
}


def reproduce(search: str) -> tuple[str, dict]:
    r = reproduce_zigzag_example(ZZ / "inputs/workload/resnet18.onnx", ZZ / "inputs/hardware/tpu_like.yaml",
                                 ZZ / "inputs/mapping/tpu_like.yaml", search=search)
    same = sum(la["energy_pj"] == la["zigzag_energy_pj"] and la["cycles"] == la["zigzag_cycles"]
               for la in r["layers"])
    lines = [f"ResNet-18 (`zigzag/inputs/workload/resnet18.onnx`, {len(r['layers'])} Conv/Gemm layers) on "
             f"ZigZag's `tpu_like.yaml` + `mapping/tpu_like.yaml`, search `{search}` (lpf_limit "
             f"{'6' if search == 'full' else '4'}), zigzag-dse {_zigzag_version()}:", "",
             "| | energy (pJ) | latency (cycles) | wall s |", "|---|---:|---:|---:|",
             f"| bridge, layer by layer (MacOp -> ZigZag) | {r['bridge_energy_pj']:.3f} | {r['bridge_cycles']:.0f} "
             f"| {r['bridge_seconds']:.1f} |",
             f"| `zigzag.api.get_hardware_performance_zigzag` | {r['zigzag_energy_pj']:.3f} | "
             f"{r['zigzag_cycles']:.0f} | {r['zigzag_seconds']:.1f} |"]
    if search == "full":
        lines.append(f"| ZigZag's test expects | {EXPECTED[0]:.3f} | {EXPECTED[1]:.0f} | |")
    rel = abs(r["bridge_energy_pj"] - r["zigzag_energy_pj"]) / r["zigzag_energy_pj"]
    lines += ["", f"{same}/{len(r['layers'])} layers identical in energy and cycles; totals differ by "
              f"{rel:.1e} (relative) in energy and {abs(r['bridge_cycles'] - r['zigzag_cycles']):.0f} cycles."]
    return "\n".join(lines), r


def search_gap(designs: list[str]) -> tuple[str, dict]:
    rows = []
    for name in designs:
        arch = Arch.preset(name)
        for layer, op in VIT_LAYERS.items():
            row = {"design": name, "layer": layer, "shape": describe(op)}
            for mode in ("fast", "full"):
                t0 = time.perf_counter()
                c = cost_mac_op(op, arch, search=mode)
                row[mode] = {"seconds": time.perf_counter() - t0, "energy_pj": c.energy_pj, "cycles": c.cycles}
            rows.append(row)

    def gap(row: dict, what: str) -> float:
        return row["fast"][what] / row["full"][what] - 1

    lines = ["| design | layer | fast s | full s | energy fast/full - 1 | cycles fast/full - 1 |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['design']} | {r['layer']} | {r['fast']['seconds']:.2f} | {r['full']['seconds']:.2f} | "
              f"{100 * gap(r, 'energy_pj'):+.2f}% | {100 * gap(r, 'cycles'):+.2f}% |" for r in rows]
    fast_s = [r["fast"]["seconds"] for r in rows]
    full_s = [r["full"]["seconds"] for r in rows]
    e_gap = [gap(r, "energy_pj") for r in rows]
    c_gap = [gap(r, "cycles") for r in rows]
    summary = (f"{len(rows)} layer searches: fast {statistics.mean(fast_s):.2f} s mean / {max(fast_s):.2f} s max, "
               f"full {statistics.mean(full_s):.2f} s mean / {max(full_s):.2f} s max per layer. fast vs full: energy "
               f"{100 * min(e_gap):+.2f}% .. {100 * max(e_gap):+.2f}% (mean |gap| "
               f"{100 * statistics.mean(map(abs, e_gap)):.2f}%), cycles {100 * min(c_gap):+.2f}% .. "
               f"{100 * max(c_gap):+.2f}% (mean |gap| {100 * statistics.mean(map(abs, c_gap)):.2f}%).")
    return summary + "\n\n" + "\n".join(lines), {"rows": rows}


def _zigzag_version() -> str:
    from importlib.metadata import version

    return version("zigzag-dse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("reproduce")
    rp.add_argument("--search", choices=("fast", "full"), default="full")
    sp = sub.add_parser("search")
    sp.add_argument("--designs", default="simba-v8,simba-v16,simba-v32,simba-v64")
    for p in (rp, sp):
        p.add_argument("--out", type=Path, default=None, help="also write the raw results (JSON) here")
        p.add_argument("--doc", action="store_true", help="write the Markdown table to benchmarks/results/")
    args = ap.parse_args()
    if args.cmd == "reproduce":
        text, raw = reproduce(args.search)
        tag, heading = "accel-zigzag-resnet18", "ZigZag bridge: ResNet-18 on tpu_like"
    else:
        text, raw = search_gap(args.designs.split(","))
        tag, heading = "accel-zigzag-search", "ZigZag bridge: fast vs full mapping search"
    import datetime as dt
    import sys

    from dynavit.sweep.engine import cpu_name

    text = (f"Machine: {cpu_name()}. Date: {dt.date.today()}. Command: `.venv/bin/python benchmarks/accel_resnet18.py "
            f"{' '.join(sys.argv[1:])}`.\n\n" + text)
    print(text)
    print(f"wrote {write_json(tag, raw)}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{tag}.json").write_text(json.dumps(raw, indent=1))
    if args.doc:
        print(f"wrote {write_section(tag, heading, text)}")


if __name__ == "__main__":
    main()
