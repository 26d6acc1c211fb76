"""Fashion-MNIST: a single-image ViT against ConcatPlexer and Image Multiplexer at N = 2 and 4.

All five models start from the same random initialisation and get the same training budget
(steps x images per step, same augmentation); the multiplexed ones distil from the trained
single-image ViT (plus labels). Reported per model: test top-1 (10,000 images, 95% CI), MACs
per image counted by the dispatch-level profiler, and images/s measured at the same batch
size, all models timed in one run, round-robin, medians.

    flock /tmp/dynavit-bench.lock .venv/bin/python benchmarks/multiplex_fashion.py

Runs resume from their checkpoints in ``--out``. Markdown to stdout, JSON to
benchmarks/results/multiplex-fashion.json (and a copy in ``--out``/fashion.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from docsection import write_json
from transformers import ViTConfig

from dynavit.cost.flops import macs_per_image
from dynavit.data.fashion import CLASSES, MEAN, STD, FashionMNIST
from dynavit.data.metrics import ClassificationMeter
from dynavit.model import from_config
from dynavit.multiplex import build, load_multiplexer, save_multiplexer
from dynavit.sweep.engine import device_name, versions
from dynavit.train import augment
from dynavit.train.loop import Recipe
from dynavit.train.multiplex import Distill, train_multiplex
from dynavit.train.supervised import train_supervised


def vit(args: argparse.Namespace):
    cfg = ViTConfig(image_size=32, patch_size=4, hidden_size=args.dim, num_hidden_layers=args.depth,
                    num_attention_heads=args.heads, intermediate_size=4 * args.dim, num_labels=len(CLASSES),
                    id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    lm = from_config(cfg, seed=args.seed, source=f"vit-fashion-d{args.dim}x{args.depth}")
    lm.mean, lm.std, lm.input_size, lm.crop_pct = MEAN, STD, (32, 32), 1.0
    return lm


def top1(model, x: torch.Tensor, y: torch.Tensor, batch: int = 400) -> dict:
    meter = ClassificationMeter(len(CLASSES))
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            meter.update(model(x[i:i + batch]), y[i:i + batch])
    return meter.result(1000, 0)["top1"]


def throughput(models: dict[str, object], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Seconds per batch of every model, timed round-robin so that load on the machine hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
            m(x)
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--patchifier-depth", type=int, default=1)
    ap.add_argument("--mux", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--timing-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/bench-multiplex"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = FashionMNIST("train"), FashionMNIST("test")
    xt, yt = test.tensors()
    recipe = Recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=max(1, args.steps // 20),
                    crop=(32, 32), seed=args.seed, checkpoint_every=100)
    aug = functools.partial(augment.classification_sample, scale=(0.6, 1.0))
    tty = sys.stderr.isatty()

    teacher = vit(args)
    t0 = time.perf_counter()
    train_supervised(teacher, train, args.out / "vit", recipe, progress=tty, augmentation=aug)
    rows = [{"model": "ViT (single image)", "key": "vit", "mux": 1, "train_s": time.perf_counter() - t0}]
    models: dict[str, object] = {"vit": teacher.module}
    for arch in ("concatplexer", "imagemux"):
        for n in args.mux:
            folder = args.out / f"{arch}-{n}"
            student = build(vit(args), arch, n, args.patchifier_depth)  # the ViT's random init, not its weights
            t0 = time.perf_counter()
            train_multiplex(student, teacher, train, folder, recipe, Distill(), progress=tty, augmentation=aug)
            save_multiplexer(student, folder / "model", {"recipe": json.dumps(recipe.__dict__)})
            models[folder.name] = load_multiplexer(folder / "model", teacher)  # evaluate what was saved
            name = "ConcatPlexer" if arch == "concatplexer" else "Image Multiplexer"
            rows.append({"model": f"{name} N={n}", "key": folder.name, "mux": n,
                         "train_s": time.perf_counter() - t0})
    for r in rows:
        module = models[r["key"]]
        r["top1"] = top1(module, xt, yt)
        r["macs_by_class"] = macs_per_image(module, xt[:r["mux"]])
        r["macs"] = sum(r["macs_by_class"].values())
    times = throughput(models, xt[:args.timing_batch], args.rounds)
    for r in rows:
        med = statistics.median(times[r["key"]])
        r.update(batch_ms=med * 1e3, images_per_s=args.timing_batch / med,
                 batch_ms_all=[t * 1e3 for t in times[r["key"]]])
    base = rows[0]
    for r in rows:
        r["macs_ratio"], r["speedup"] = r["macs"] / base["macs"], r["images_per_s"] / base["images_per_s"]

    print(f"Fashion-MNIST test (10,000 images); ViT d={args.dim}, depth {args.depth}, {args.heads} heads, patch 4, "
          f"32x32; patchifier = patch embedding + {args.patchifier_depth} block(s); {args.steps} steps x "
          f"{args.batch_size} images for every model; images/s at batch {args.timing_batch} on "
          f"{device_name(torch.device('cpu'))}, median of {args.rounds} round-robin runs.\n")
    print("| model | top-1 % (95% CI) | MACs / image | vs ViT | images/s | vs ViT | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["top1"]
        print(f"| {r['model']} | {100 * t['value']:.2f} ({100 * t['ci_low']:.2f}-{100 * t['ci_high']:.2f}) | "
              f"{r['macs'] / 1e6:.2f} M | {r['macs_ratio']:.3f}x | {r['images_per_s']:.0f} | {r['speedup']:.2f}x | "
              f"{r['train_s']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = write_json("multiplex-fashion", {
        "args": {k: str(v) for k, v in vars(args).items()},
        "device": device_name(torch.device("cpu")), "versions": versions(), "rows": rows})
    (args.out / "fashion.json").write_text(raw.read_text())


if __name__ == "__main__":
    main()
