"""SaiT dense/sparse training and weight-shared path retraining vs the training-free paths, scored before and after.

Two settings:
- ``deit``: DeiT-tiny, LABEL-FREE. The 500 ImageNet sample images are split 250/250 by a hash of
  the file name (``multiplex_deit.split``); training sees the first half without labels (the
  default path distils from the frozen model as loaded, every other path from the default path
  of the same step); the second half is scored with its labels.
- ``fashion``: a ViT trained from scratch on Fashion-MNIST's 60k training images (the model of
  ``multiplex_fashion.py``, trained longer here; resumable), then paths / SaiT training WITH labels;
  scored on the 10k test images.
Scores before and after are on the same images (paired bootstrap CIs of the change). Both arms
start from the same weights, calibrated on 64 training images.

- ``sait``: keep rates 0.8/0.7/0.6/0.5 pruned after 3 blocks at 1/4, 1/2, 3/4 of the depth (EViT's
  placement), early token-selection distillation; scored at fixed keep rates and per-image thresholds.
- ``paths``: the space below (resolution, MLP width, heads, MLP skips), sandwich rule.
- ``dense``: the control: the same steps, recipe and labels on the default path alone (plain
  supervised training), scored on the SaiT paths. It separates what restarting the optimiser costs
  from what the other paths' pull costs.

With labels the default path's loss is ``(1 - w) * KD(model as loaded) + w * CE`` (``--label-weight w``,
default 1: labels only). ``--default-weight`` scales the default path's loss against each other path's.

    flock /tmp/dynavit-bench.lock .venv/bin/python benchmarks/train_paths.py --setting deit --arm sait
    flock /tmp/dynavit-bench.lock .venv/bin/python benchmarks/train_paths.py --setting fashion --arm paths

Markdown to stdout and to benchmarks/results/train-<setting>-<arm>[-<variant>].md; JSON beside it (and a
copy in ``--out``); every training resumes from its checkpoint under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from docsection import RESULTS, write_json, write_section
from multiplex_deit import split

import dynavit
from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.data import UnlabelledImages, open_dataset
from dynavit.errors import DynavitError
from dynavit.sweep import stats
from dynavit.sweep.engine import device_name, versions
from dynavit.sweep.space import build_space
from dynavit.train import augment
from dynavit.train.distill import Distill
from dynavit.train.loop import Recipe
from dynavit.train.paths import default_token_layers, space_paths, token_paths, train_paths
from dynavit.train.supervised import train_supervised

KEEPS = (0.8, 0.7, 0.6, 0.5)
TAUS = (0.97, 0.93, 0.9, 0.85)


def paths_space(resolution: int) -> dict:
    r = resolution
    return {"resolution": [r, r * 6 // 7 // 16 * 16 or r, r * 5 // 7 // 16 * 16 or r] if r >= 112 else [r],
            "mlp_width": [1.0, 0.85, 0.7, 0.55], "heads": [None, 2], "skip_mlp": [0, 1, 2]}


def eval_configs(arm: str, smallest: ExecConfig, layers: tuple[int, ...], resolution: int) -> dict[str, ExecConfig]:
    cfgs = {"default": ExecConfig()}
    if arm in ("sait", "dense"):
        for k in KEEPS:
            cfgs[f"keep {k}"] = ExecConfig(token_method="prune", token_keep=k, token_layers=layers)
        for t in TAUS:
            cfgs[f"adaptive tau {t}"] = ExecConfig(token_method="prune", token_threshold=t, token_layers=layers)
        return cfgs
    cfgs.update({"mlp_width 0.7": ExecConfig(mlp_width=0.7), "mlp_width 0.55": ExecConfig(mlp_width=0.55),
                 "heads 2": ExecConfig(heads=2)})
    if resolution >= 112:
        r = resolution * 6 // 7 // 16 * 16
        cfgs.update({f"resolution {r}": ExecConfig(resolution=(r, r)),
                     f"resolution {r}, mlp_width 0.85": ExecConfig(resolution=(r, r), mlp_width=0.85)})
    cfgs["smallest"] = smallest
    return cfgs


def measure(dm, cfgs: dict[str, ExecConfig], x: torch.Tensor, y: torch.Tensor, mac_probe: int) -> dict[str, dict]:
    """Per config: per-image correctness, and MACs per image (image by image on ``mac_probe`` images for
    adaptive paths, whose cost varies per image)."""
    out = {}
    for name, cfg in cfgs.items():
        dm.configure(cfg)
        with torch.inference_mode():
            pred = torch.cat([dm(x[i:i + 100]).argmax(-1) for i in range(0, len(x), 100)])
        probe = x[:mac_probe] if cfg.token_threshold is not None else x[:1]
        with torch.no_grad():
            macs = float(np.mean([sum(macs_per_image(dm.module, probe[i:i + 1]).values()) for i in range(len(probe))]))
        hits = (pred == y).numpy().astype(np.float64)[:, None]  # (N, 1): the per-image layout of dynavit.sweep.stats
        out[name] = {"hits": hits, "macs": macs, "pred": pred}
    dm.configure(ExecConfig())
    return out


def deit_setting(args: argparse.Namespace):
    root = assets_dir()
    if root is None:
        raise DynavitError("the shared assets are missing (set DYNAVIT_ASSETS)")
    dm = dynavit.load(deit_tiny_source())
    data = open_dataset(root / "imagenet-samples")
    train_idx, eval_idx = split(data)
    pairs = [data.load(i) for i in eval_idx[:args.eval_limit]]
    x = torch.stack([dm.transform(img) for img, _ in pairs])
    y = torch.tensor([t for _, t in pairs])
    calib = [data.load(i)[0] for i in train_idx[:64]]
    files = [data.path(i) for i in train_idx]
    extra = ""
    if args.extra_camvid:  # more unlabelled photos: every CamVid frame (road scenes, not ImageNet classes)
        folders = [UnlabelledImages(root / "camvid" / split / "images") for split in ("train", "val")]
        frames = [f.path(i) for f in folders for i in range(len(f))]
        files += frames
        extra = f" plus {len(frames)} CamVid frames"
    what = (f"DeiT-tiny, label-free: {len(train_idx)} ImageNet sample images{extra} (no labels) to train, the other "
            f"{len(x)} with labels to score")
    return dm, UnlabelledImages.from_paths(files), x, y, calib, False, what, augment.classification_sample


def fashion_setting(args: argparse.Namespace):
    from multiplex_fashion import top1, vit

    from dynavit.data.fashion import FashionMNIST

    train, test = FashionMNIST("train"), FashionMNIST("test")
    x, y = test.tensors()
    x, y = x[:args.eval_limit], y[:args.eval_limit]
    dm = vit(argparse.Namespace(dim=96, depth=6, heads=3, seed=args.seed))
    aug = functools.partial(augment.classification_sample, scale=(0.6, 1.0))
    recipe = Recipe(steps=args.base_steps, batch_size=128, lr=1e-3, warmup=max(1, args.base_steps // 20),
                    crop=(32, 32), seed=args.seed, checkpoint_every=100)
    t0 = time.perf_counter()
    train_supervised(dm, train, args.out / "fashion-vit", recipe, progress=sys.stderr.isatty(), augmentation=aug)
    acc = top1(dm, x, y)["value"]
    print(f"ViT trained from scratch: {args.base_steps} steps x 128, top-1 {100 * acc:.2f} % "
          f"({time.perf_counter() - t0:.0f} s this call)", file=sys.stderr)
    calib = [train.load(i)[0] for i in range(64)]
    what = (f"ViT d=96 x 6 blocks trained from scratch on Fashion-MNIST ({args.base_steps} steps x 128), then trained "
            f"with labels on the 60k training images; scored on {len(x)} test images")
    return dm, train, x, y, calib, True, what, aug


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=("deit", "fashion"), default="deit")
    ap.add_argument("--arm", choices=("sait", "paths", "dense"), required=True)
    ap.add_argument("--steps", type=int, default=None, help="path training steps (deit 200, fashion 600)")
    ap.add_argument("--batch-size", type=int, default=None, help="deit 16, fashion 128")
    ap.add_argument("--lr", type=float, default=None, help="deit 1e-5, fashion 2e-4")
    ap.add_argument("--base-steps", type=int, default=4000, help="fashion: steps of the from-scratch ViT")
    ap.add_argument("--token-distill", type=float, default=0.1)
    ap.add_argument("--default-weight", type=float, default=1.0,
                    help="weight of the default path's loss against each other path's")
    ap.add_argument("--label-weight", type=float, default=1.0,
                    help="with labels: CE share of the default path's loss (the rest: KD from the model as loaded)")
    ap.add_argument("--extra-camvid", action="store_true", help="deit: add the 468 CamVid frames as unlabelled images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="score only this many images (smoke runs)")
    ap.add_argument("--mac-probe", type=int, default=250, help="images whose MACs are averaged for adaptive paths")
    ap.add_argument("--variant", default="", help="a name for a recipe variant: its own run folder and doc section")
    ap.add_argument("--out", type=Path, default=Path("out/bench-train-paths"))
    args = ap.parse_args()
    deit = args.setting == "deit"
    steps = args.steps or (200 if deit else 600)
    batch = args.batch_size or (16 if deit else 128)
    lr = args.lr or (1e-5 if deit else 2e-4)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dm, train_set, x, y, calib, use_labels, what, aug = (deit_setting if deit else fashion_setting)(args)
    dm.calibrate(calib)

    layers = default_token_layers(dm.space.num_blocks)
    resolution = dm.space.default_resolution[0]
    if args.arm in ("sait", "dense"):
        paths = token_paths(KEEPS, layers, n_random=1)
        token_distill = args.token_distill
    else:
        paths = space_paths(build_space(paths_space(resolution), dm.space), n_random=2)
        token_distill = 0.0
    cfgs = eval_configs(args.arm, paths.smallest, layers, resolution)
    before = measure(dm, cfgs, x, y, args.mac_probe)
    recipe = Recipe(steps=steps, batch_size=batch, lr=lr, warmup=max(1, steps // 10), crop=dm.input_size,
                    seed=args.seed, checkpoint_every=20)
    tag = ("" if deit else "fashion-") + (f"{args.variant}-" if args.variant else "")
    t0 = time.perf_counter()
    if args.arm == "dense":
        if not use_labels:
            raise DynavitError("the dense control trains with labels (--setting fashion)")
        res = train_supervised(dm, train_set, args.out / f"{tag}{args.arm}", recipe, progress=sys.stderr.isatty(),
                               augmentation=aug)
    else:
        res = train_paths(dm, train_set, args.out / f"{tag}{args.arm}", recipe, paths,
                          distill=Distill(1.0, args.label_weight, use_labels), token_distill=token_distill,
                          default_weight=args.default_weight, progress=sys.stderr.isatty(), augmentation=aug)
    train_s = res.total_seconds or time.perf_counter() - t0  # every call of a resumed run
    after = measure(dm, cfgs, x, y, args.mac_probe)

    full = before["default"]["macs"]
    how = ("supervised training of the default path alone (the control)" if args.arm == "dense"
           else f"`--mode {args.arm}`")
    w = args.label_weight
    anchor = ("" if args.arm == "dense" or not use_labels or w == 1 else
              f" Default path loss: {1 - w:g} x KD from the model as loaded + {w:g} x CE.")
    if args.arm != "dense" and args.default_weight != 1:
        anchor += f" The default path's loss is weighted {args.default_weight:g}x against each other path's."
    lines = [f"{what}. {how}: {steps} steps x {batch}, lr {lr}, {train_s / 60:.1f} min on "
             f"{device_name(torch.device('cpu'))}. Token layers {list(layers)}. Top-1 % with bootstrap 95 % CI; "
             "the change is paired (same images). MACs of adaptive paths: mean over "
             f"{min(args.mac_probe, len(x))} images, one at a time.{anchor}", "",
             "| path | GMACs / image | vs default | top-1 before | top-1 after | change (95% CI) | "
             "after, vs default path after (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for name in cfgs:
        b, a = before[name], after[name]
        qb, (lb, hb) = stats.point(b["hits"], "classification"), stats.percentile_ci(
            stats.replicates(b["hits"], "classification"))
        qa, (la, ha) = stats.point(a["hits"], "classification"), stats.percentile_ci(
            stats.replicates(a["hits"], "classification"))
        d, dlo, dhi = stats.paired_delta(a["hits"], b["hits"], "classification")
        g, glo, ghi = stats.paired_delta(a["hits"], after["default"]["hits"], "classification")
        lines.append(f"| {name} | {a['macs'] / 1e9:.4f} | {a['macs'] / full:.3f}x | {100 * qb:.2f} "
                     f"({100 * lb:.1f}-{100 * hb:.1f}) | {100 * qa:.2f} ({100 * la:.1f}-{100 * ha:.1f}) | "
                     f"{100 * d:+.2f} ({100 * dlo:+.1f} to {100 * dhi:+.1f}) | "
                     + ("" if name == "default" else f"{100 * g:+.2f} ({100 * glo:+.1f} to {100 * ghi:+.1f})") + " |")
        rows.append({"path": name, "config": cfgs[name].to_dict(), "macs_before": b["macs"], "macs_after": a["macs"],
                     "top1_before": qb, "top1_after": qa, "delta": [d, dlo, dhi],
                     "vs_default_after": [g, glo, ghi]})
    agree = float((after["default"]["pred"] == before["default"]["pred"]).float().mean())
    lines += ["", f"Default path after training agrees with the original on {100 * agree:.1f} % of the images."]
    body = "\n".join(lines)
    print(body)
    cmd = f"`.venv/bin/python {' '.join(sys.argv)}`"
    name = f"{args.setting}-{args.arm}" + (f"-{args.variant}" if args.variant else "")
    if args.eval_limit is None:
        write_section(f"train-{name}", f"Training: {args.setting}, {args.arm} {args.variant}".rstrip(),
                      f"Date: {time.strftime('%Y-%m-%d')}. Command: {cmd}.\n\n{body}")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()},
               "device": device_name(torch.device("cpu")), "versions": versions(), "train_seconds": train_s,
               "train_losses": res.losses, "rows": rows, "default_agreement": agree}
    raw = write_json(f"train-{name}", payload, folder=RESULTS if args.eval_limit is None else args.out)
    (args.out / f"{name}.json").write_text(raw.read_text())


if __name__ == "__main__":
    main()
