"""ConcatPlexer N=2 on DeiT-tiny's weights, distilled from DeiT-tiny on 250 unlabelled images, scored on 250 others.

The 500 ImageNet sample images are split 250/250 in the order of a hash of the file name (stable,
label-blind): the training half is used without labels (the teacher's logits are the only
target), the other half is scored with its labels. Reported: top-1 of DeiT-tiny, of the ConcatPlexer at
initialisation (average-pooling multiplexer, random slot embeddings) and after training, its
agreement with the teacher, MACs per image (dispatch-level profiler) and images/s measured
side by side (round-robin, medians) at one batch size.

    flock /tmp/dynavit-bench.lock .venv/bin/python benchmarks/multiplex_deit.py

Markdown to stdout, JSON to benchmarks/results/multiplex-deit.json (and a copy in ``--out``/deit.json); the
run resumes from ``--out``/cp2/checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from docsection import write_json
from multiplex_fashion import throughput

import dynavit
from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.cost.flops import macs_per_image
from dynavit.data import ClassificationMeter, open_dataset
from dynavit.errors import DynavitError
from dynavit.multiplex import build, save_multiplexer
from dynavit.sweep.engine import device_name, versions
from dynavit.train.loop import Recipe
from dynavit.train.multiplex import Distill, train_multiplex


def split(dataset) -> tuple[list[int], list[int]]:
    """Training and evaluation halves: images ordered by a hash of the file name, first half / second half."""
    order = sorted(range(len(dataset)), key=lambda i: hashlib.sha1(dataset.path(i).name.encode()).hexdigest())
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def scores(model, x: torch.Tensor, y: torch.Tensor, teacher_pred: torch.Tensor | None, batch: int = 50) -> dict:
    meter = ClassificationMeter(1000)
    preds = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            meter.update(out, y[i:i + batch])
            preds.append(out.argmax(-1))
    pred = torch.cat(preds)
    res = meter.result(1000, 0)["top1"]
    if teacher_pred is not None:
        res["agreement_with_teacher"] = float((pred == teacher_pred).float().mean())
    return {**res, "pred": pred}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--patchifier-depth", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--timing-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="score only this many images (smoke runs)")
    ap.add_argument("--out", type=Path, default=Path("out/bench-multiplex"))
    args = ap.parse_args()
    root = assets_dir()
    if root is None:
        raise DynavitError("the shared assets are missing (set DYNAVIT_ASSETS)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    teacher = dynavit.load(deit_tiny_source())
    data = open_dataset(root / "imagenet-samples")
    train_idx, eval_idx = split(data)
    train_set = data.subset(train_idx)
    pairs = [data.load(i) for i in eval_idx[:args.eval_limit]]
    xe = torch.stack([teacher.transform(img) for img, _ in pairs])
    ye = torch.tensor([t for _, t in pairs])

    student = build(teacher, "concatplexer", 2, args.patchifier_depth)
    init = build(teacher, "concatplexer", 2, args.patchifier_depth).eval()  # the same model, untrained
    recipe = Recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=max(1, args.steps // 10),
                    crop=teacher.input_size, seed=args.seed, checkpoint_every=20)
    t0 = time.perf_counter()
    res = train_multiplex(student, teacher, train_set, args.out / "cp2-deit", recipe,
                          Distill(temperature=args.temperature, use_labels=False), progress=sys.stderr.isatty())
    train_s = time.perf_counter() - t0
    save_multiplexer(student, args.out / "cp2-deit" / "model", {"teacher": str(teacher.source),
                                                               "recipe": json.dumps(recipe.__dict__)})

    base = scores(teacher, xe, ye, None)
    rows = [("DeiT-tiny (single image)", teacher.module, base),
            ("ConcatPlexer N=2, untrained", init, scores(init, xe, ye, base["pred"])),
            (f"ConcatPlexer N=2, distilled ({args.steps} steps)", student.eval(),
             scores(student, xe, ye, base["pred"]))]
    costs = [macs_per_image(m, xe[:2]) for _, m, _ in rows]
    x = xe[:args.timing_batch]
    times = throughput({"deit": teacher.module, "cp2": student}, x, args.rounds)
    ips = {k: args.timing_batch / statistics.median(v) for k, v in times.items()}

    print(f"DeiT-tiny teacher; ConcatPlexer N=2 (patchifier: patch embedding + {args.patchifier_depth} block, "
          f"2x1 conv multiplexer) distilled without labels on {len(train_idx)} ImageNet sample images "
          f"({args.steps} steps x {args.batch_size}, {train_s / 60:.1f} min), scored on the other "
          f"{len(eval_idx)}; images/s at batch {args.timing_batch} on {device_name(torch.device('cpu'))}, "
          f"median of {args.rounds} round-robin runs.\n")
    print("| model | top-1 % (95% CI) | agrees with DeiT-tiny | GMACs / image | vs DeiT-tiny | images/s |")
    print("|---|---|---|---|---|---|")
    total = [sum(c.values()) for c in costs]
    speed = [ips["deit"], None, ips["cp2"]]
    for (name, _, s), mac, v in zip(rows, total, speed, strict=True):
        agree = f"{100 * s['agreement_with_teacher']:.1f} %" if "agreement_with_teacher" in s else "-"
        print(f"| {name} | {100 * s['value']:.1f} ({100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}) | {agree} | "
              f"{mac / 1e9:.3f} | {mac / total[0]:.3f}x | {f'{v:.1f}' if v else '-'} |")
    print(f"\nthroughput: {ips['cp2'] / ips['deit']:.2f}x DeiT-tiny's images/s")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = write_json("multiplex-deit", {
        "args": {k: str(v) for k, v in vars(args).items()},
        "device": device_name(torch.device("cpu")), "versions": versions(), "train_seconds": train_s,
        "train_losses": res.losses, "n_train": len(train_idx), "n_eval": len(eval_idx),
        "rows": [{"model": n, **{k: v for k, v in s.items() if k != "pred"}, "macs_by_class": c, "macs": t}
                 for (n, _, s), c, t in zip(rows, costs, total, strict=True)],
        "images_per_s": ips, "batch_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}})
    (args.out / "deit.json").write_text(raw.read_text())


if __name__ == "__main__":
    main()
