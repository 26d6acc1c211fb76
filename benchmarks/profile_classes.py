"""FLOP share vs measured time share per operator class; our counter vs torch's FlopCounterMode.

Writes benchmarks/results/profile-classes-<device>.{md,json}. Run:

    .venv/bin/python benchmarks/profile_classes.py [--device cuda] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

import torch
from docsection import write_json, write_section
from torch.utils.flop_counter import FlopCounterMode

import dynavit
from dynavit.assets import deit_tiny_source
from dynavit.sweep.engine import cpu_name


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} threads={torch.get_num_threads()}"


def class_rows(p: dynavit.Profile) -> list[str]:
    rows = []
    for name, c in p.classes.items():
        if c.flops or c.time_ms > 0.005 * p.instrumented_ms:
            rows.append(f"| {name} | {c.macs / 1e9:.4f} | {c.share:.1%} | {c.flop_share:.1%} | "
                        f"{c.time_ms:.2f} | {c.time_share:.1%} |")
    return rows


def torch_counter_gmacs(lm, size) -> float:
    x = lm.example_input(1, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        lm(x)
    return fc.get_total_flops() / 2e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    models = [
        ("DeiT-tiny (real weights)", deit_tiny_source(), (224, 224)),
        ("ViT-B/16 (config)", "config:vit-b16", (224, 224)),
        ("Swin-T (config)", "config:swin-t", (224, 224)),
        ("SegFormer-B2 (config, ADE20K head)", "config:segformer-b2", (512, 512)),
        ("SegFormer-B2, stock transformers forward", "config:segformer-b2#reference", (512, 512)),
    ]
    out = [
        f"Machine: {machine(args.device)}. Date: {dt.date.today()}. Command: "
        f"`.venv/bin/python benchmarks/profile_classes.py --device {args.device} --dtypes {' '.join(args.dtypes)}"
        f" --repeats {args.repeats}`. Batch 1. Time per class is the median of {args.repeats} instrumented runs; "
        "latency is the median of the same number of uninstrumented runs.",
        "",
        "### MAC counts: dynavit vs `torch.utils.flop_counter.FlopCounterMode`",
        "",
        "| model | input | dynavit GMAC | FlopCounterMode GMAC | missed by FlopCounterMode |",
        "|---|---|---|---|---|",
    ]
    loaded = {}
    raw: dict = {"counts": [], "profiles": []}
    for title, src, size in models:
        if src.endswith("#reference"):  # the source library's own forward, same weights, same counter
            loaded[title] = dynavit.load(src.removesuffix("#reference")).reference
            continue
        lm = dynavit.load(src)
        loaded[title] = lm
        ours = dynavit.cost.total_macs(lm.module, lambda lm=lm, size=size: lm(lm.example_input(1, size))) / 1e9
        theirs = torch_counter_gmacs(lm, size)
        out.append(f"| {title} | {size[0]}x{size[1]} | {ours:.4f} | {theirs:.4f} | {1 - theirs / ours:.1%} |")
        raw["counts"].append({"model": title, "input": list(size), "dynavit_gmac": ours, "flopcounter_gmac": theirs})
    for title, _src, size in models:
        lm = loaded[title]
        for dtype in args.dtypes:
            if isinstance(lm, torch.nn.Module) and dtype != "fp32":
                continue
            p = dynavit.profile(lm, input_size=size, device=args.device, dtype=dtype, repeats=args.repeats)
            raw["profiles"].append({"model": title, "input": list(size), "dtype": dtype, **p.to_json()})
            out += [
                "",
                f"### {title}, {size[0]}x{size[1]}, {args.device} {dtype}: {p.total_macs / 1e9:.4f} GMAC, "
                f"latency p50 {p.latency_ms:.2f} ms (instrumented sum {p.instrumented_ms:.2f} ms)",
                "",
                "| class | GMAC | MAC share | FLOP share | time ms | time share |",
                "|---|---|---|---|---|---|",
                *class_rows(p),
            ]
            print(out[-len(class_rows(p)) - 4])
    section = "\n".join(out)
    heading = f"Profiler: FLOP share vs time share per operator class ({args.device})"
    tag = f"profile-classes-{args.device}"
    print(f"wrote {write_section(tag, heading, section)} and {write_json(tag, raw)}")


if __name__ == "__main__":
    main()
