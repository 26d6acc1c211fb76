"""DeiT-tiny: SaiT dense/sparse training and weight-shared path retraining, label-free, vs training-free paths.

The 500 ImageNet sample images are split 250/250 by a hash of the file name (``multiplex_deit.split``).
Training uses the first half WITHOUT labels: the default path distils from the frozen model as
loaded, every other path from the default path of the same step. The second half is scored with
its labels, before and after training, on the same images (paired bootstrap CIs of the change).
Both arms start from the same calibrated weights (calibration on 64 training images).

- ``sait``: keep rates 0.8/0.7/0.6/0.5 pruned after blocks 3, 6, 9 (EViT placement), early
  token-selection distillation; scored at fixed keep rates and at per-image thresholds.
- ``paths``: the space below (resolution, MLP width, heads, MLP skips), sandwich rule.

    flock /tmp/dynavit-bench.lock .venv/bin/python benchmarks/train_paths_deit.py --arm sait
    flock /tmp/dynavit-bench.lock .venv/bin/python benchmarks/train_paths_deit.py --arm paths

Markdown to stdout and to docs/benchmarks.md; JSON to ``--out``/<arm>.json; training resumes from
``--out``/<arm>/checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from docsection import write_section
from multiplex_deit import split

import dynavit
from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.data import open_dataset
from dynavit.errors import DynavitError
from dynavit.sweep import stats
from dynavit.sweep.engine import device_name, versions
from dynavit.sweep.space import build_space
from dynavit.train.distill import Distill
from dynavit.train.loop import Recipe
from dynavit.train.paths import space_paths, token_paths, train_paths

LAYERS = (2, 5, 8)  # prune after the 3rd, 6th and 9th block
KEEPS = (0.8, 0.7, 0.6, 0.5)
TAUS = (0.97, 0.93, 0.9, 0.85)
PATHS_SPACE = {"resolution": [224, 192, 160], "mlp_width": [1.0, 0.85, 0.7, 0.55], "heads": [None, 2],
               "skip_mlp": [0, 1, 2]}


def eval_configs(arm: str, smallest: ExecConfig) -> dict[str, ExecConfig]:
    cfgs = {"default": ExecConfig()}
    if arm == "sait":
        for k in KEEPS:
            cfgs[f"keep {k}"] = ExecConfig(token_method="prune", token_keep=k, token_layers=LAYERS)
        for t in TAUS:
            cfgs[f"adaptive tau {t}"] = ExecConfig(token_method="prune", token_threshold=t, token_layers=LAYERS)
    else:
        cfgs.update({"mlp_width 0.7": ExecConfig(mlp_width=0.7), "mlp_width 0.55": ExecConfig(mlp_width=0.55),
                     "heads 2": ExecConfig(heads=2), "resolution 192": ExecConfig(resolution=(192, 192)),
                     "resolution 192, mlp_width 0.85": ExecConfig(resolution=(192, 192), mlp_width=0.85),
                     "smallest": smallest})
    return cfgs


def measure(dm, cfgs: dict[str, ExecConfig], x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Per config: per-image correctness, and MACs per image (image by image: adaptive paths vary)."""
    out = {}
    for name, cfg in cfgs.items():
        dm.configure(cfg)
        with torch.inference_mode():
            pred = torch.cat([dm(x[i:i + 50]).argmax(-1) for i in range(0, len(x), 50)])
        adaptive = cfg.token_threshold is not None
        probe = x if adaptive else x[:1]
        with torch.no_grad():
            macs = float(np.mean([sum(macs_per_image(dm.module, probe[i:i + 1]).values()) for i in range(len(probe))]))
        hits = (pred == y).numpy().astype(np.float64)[:, None]  # (N, 1): the per-image layout of dynavit.sweep.stats
        out[name] = {"hits": hits, "macs": macs, "pred": pred}
    dm.configure(ExecConfig())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arm", choices=("sait", "paths"), required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--token-distill", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="score only this many images (smoke runs)")
    ap.add_argument("--out", type=Path, default=Path("out/bench-train-paths"))
    args = ap.parse_args()
    root = assets_dir()
    if root is None:
        raise DynavitError("the shared assets are missing (set DYNAVIT_ASSETS)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dm = dynavit.load(deit_tiny_source())
    data = open_dataset(root / "imagenet-samples")
    train_idx, eval_idx = split(data)
    train_set = data.subset(train_idx)
    eval_idx = eval_idx[:args.eval_limit]
    pairs = [data.load(i) for i in eval_idx]
    x = torch.stack([dm.transform(img) for img, _ in pairs])
    y = torch.tensor([t for _, t in pairs])
    dm.calibrate([data.load(i)[0] for i in train_idx[:64]])

    if args.arm == "sait":
        paths = token_paths(KEEPS, LAYERS, n_random=1)
        token_distill = args.token_distill
    else:
        paths = space_paths(build_space(PATHS_SPACE, dm.space), n_random=2)
        token_distill = 0.0
    cfgs = eval_configs(args.arm, paths.smallest)
    before = measure(dm, cfgs, x, y)
    recipe = Recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=max(1, args.steps // 10),
                    crop=dm.input_size, seed=args.seed, checkpoint_every=20)
    t0 = time.perf_counter()
    res = train_paths(dm, train_set, args.out / args.arm, recipe, paths,
                      distill=Distill(temperature=1.0, use_labels=False), token_distill=token_distill,
                      progress=sys.stderr.isatty())
    train_s = time.perf_counter() - t0
    after = measure(dm, cfgs, x, y)

    full = before["default"]["macs"]
    lines = [f"DeiT-tiny, `--mode {args.arm}`, label-free: {len(train_idx)} training images (no labels), "
             f"{args.steps} steps x {args.batch_size}, lr {args.lr}, {train_s / 60:.1f} min on "
             f"{device_name(torch.device('cpu'))}; scored on the other {len(eval_idx)} with labels. "
             f"Top-1 % with bootstrap 95 % CI; the change is paired (same images).", "",
             "| path | GMACs / image | vs default | top-1 before | top-1 after | change (95% CI) |",
             "|---|---|---|---|---|---|"]
    rows = []
    for name in cfgs:
        b, a = before[name], after[name]
        qb, lb, hb = stats.point(b["hits"], "classification"), *stats.percentile_ci(
            stats.replicates(b["hits"], "classification"))
        qa, la, ha = stats.point(a["hits"], "classification"), *stats.percentile_ci(
            stats.replicates(a["hits"], "classification"))
        d, dlo, dhi = stats.paired_delta(a["hits"], b["hits"], "classification")
        lines.append(f"| {name} | {a['macs'] / 1e9:.3f} | {a['macs'] / full:.3f}x | {100 * qb:.1f} "
                     f"({100 * lb:.1f}-{100 * hb:.1f}) | {100 * qa:.1f} ({100 * la:.1f}-{100 * ha:.1f}) | "
                     f"{100 * d:+.1f} ({100 * dlo:+.1f} to {100 * dhi:+.1f}) |")
        rows.append({"path": name, "config": cfgs[name].to_dict(), "macs_before": b["macs"], "macs_after": a["macs"],
                     "top1_before": qb, "top1_after": qa, "delta": [d, dlo, dhi]})
    agree = float((after["default"]["pred"] == before["default"]["pred"]).float().mean())
    lines.append("")
    lines.append(f"Default path after training agrees with the original on {100 * agree:.1f} % of the images.")
    body = "\n".join(lines)
    print(body)
    cmd = f"`.venv/bin/python benchmarks/train_paths_deit.py --arm {args.arm}`"
    write_section(f"train-deit-{args.arm}", f"Training: DeiT-tiny, {args.arm}, label-free",
                  f"Date: {time.strftime('%Y-%m-%d')}. Command: {cmd}.\n\n{body}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.arm}.json").write_text(json.dumps({
        "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
        "device": device_name(torch.device("cpu")), "versions": versions(), "train_seconds": train_s,
        "train_losses": res.losses, "rows": rows, "default_agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
