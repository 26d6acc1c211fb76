"""Batch-1 time of DeiT-tiny's token paths on real photos, against the default path.

A token path saves MACs in proportion to the tokens it removes, but at batch 1 each merge or
prune is a handful of small tensor operations per block, and on a CPU those cost a noticeable
part of a 20-30 ms forward. This benchmark measures what is left of the saving: every path
(and the default) runs on the same photos, shuffled round-robin, one image per run, and each
path's time is reported as the median of its runs over the default's runs on the same image in
the same round (a paired ratio), beside its MACs (the mean over the same photos, since per-image
merges keep different counts on different images). Token paths need no calibration.

    .venv/bin/python benchmarks/token_latency.py [--images 16] [--rounds 20] [--threads 2]

Writes benchmarks/results/token-latency-cpu-<threads>t.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from docsection import write_json, write_section

import dynavit
from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.cost import total_macs
from dynavit.data.datasets import list_images, read_image

ALL = tuple(range(12))
PATHS = {
    "default": ExecConfig(),
    "merge similar 0.95, -0.01 per block": ExecConfig(token_method="merge", token_threshold=0.95,
                                                      token_threshold_step=0.01),
    "merge similar 0.92, -0.01 per block": ExecConfig(token_method="merge", token_threshold=0.92,
                                                      token_threshold_step=0.01),
    "merge similar 0.895, -0.01 per block": ExecConfig(token_method="merge", token_threshold=0.895,
                                                       token_threshold_step=0.01),
    "merge keep 0.9 every block": ExecConfig(token_method="merge", token_keep=0.9, token_layers=ALL),
    "merge constant r=8": ExecConfig(token_method="merge", token_r=8),
    "prune+merge constant r=14": ExecConfig(token_method="prune+merge", token_r=14),
    "prune keep 0.7 at 3, 6, 9 (EViT)": ExecConfig(token_keep=0.7, token_layers=(3, 6, 9)),
}


def photos(n: int, dm: dynavit.DynamicModel) -> list[torch.Tensor]:
    """``n`` photos spread over the sample set, preprocessed for ``dm`` (batch 1 each)."""
    files = list_images(assets_dir() / "imagenet-samples" / "images")
    return [dm.transform(read_image(files[i * len(files) // n]))[None] for i in range(n)]


def measure(dm: dynavit.DynamicModel, images: list[torch.Tensor], rounds: int) -> dict[str, list[list[float]]]:
    """ms[path][image] over ``rounds`` rounds; each round runs every (path, image) once, shuffled."""
    rng = np.random.default_rng(0)
    pairs = [(p, j) for p in PATHS for j in range(len(images))]
    ms: dict[str, list[list[float]]] = {p: [[] for _ in images] for p in PATHS}
    with torch.inference_mode():
        for cfg in PATHS.values():  # warm every path once
            dm.configure(cfg)
            dm(images[0])
        for _ in range(rounds):
            for i in rng.permutation(len(pairs)):
                p, j = pairs[i]
                dm.configure(PATHS[p])
                t0 = time.perf_counter()
                dm(images[j])
                ms[p][j].append((time.perf_counter() - t0) * 1e3)
    return ms


def summarise(ms: dict[str, list[list[float]]], macs: dict[str, float]) -> list[dict]:
    """Per path: median ms, the median of its per-image median over the default's, MACs vs default."""
    base = [np.median(t) for t in ms["default"]]
    rows = []
    for p, per_image in ms.items():
        ratios = [np.median(t) / b for t, b in zip(per_image, base, strict=True)]
        rows.append({"path": p, "config": PATHS[p].to_dict(), "median_ms": float(np.median(np.concatenate(per_image))),
                     "time_vs_default": float(np.median(ratios)), "time_vs_default_range": [float(min(ratios)),
                                                                                          float(max(ratios))],
                     "macs_vs_default": macs[p] / macs["default"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    dm = dynavit.load(deit_tiny_source())
    images = photos(args.images, dm)
    macs = {}
    for p, cfg in PATHS.items():
        dm.configure(cfg)
        macs[p] = float(np.mean([total_macs(dm.module, lambda x=x: dm(x)) for x in images]))
    rows = summarise(measure(dm, images, args.rounds), macs)
    device = f"CPU, {torch.get_num_threads()} threads"
    name = f"token-latency-cpu-{args.threads}t"
    write_json(name, {"device": device, "images": args.images, "rounds": args.rounds,
                                     "minutes": round((time.time() - t0) / 60, 1), "rows": rows})
    table = ["| path | MACs vs default | median ms | time vs default [range over images] |", "|---|---|---|---|"]
    table += [f"| {r['path']} | {r['macs_vs_default']:.2f} | {r['median_ms']:.1f} | {r['time_vs_default']:.2f} "
              f"[{r['time_vs_default_range'][0]:.2f}, {r['time_vs_default_range'][1]:.2f}] |" for r in rows]
    write_section(name, f"DeiT-tiny token paths at batch 1 (CPU, {args.threads} threads)",
                  f"{device}, {args.images} photos x {args.rounds} rounds, shuffled round-robin, "
                  f"{(time.time() - t0) / 60:.1f} min.\n\n" + "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
