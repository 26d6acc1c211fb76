"""DeiT-tiny: does a smaller model derived from it and distilled on unlabelled images beat the original's own
paths at the same MACs?

The 500 ImageNet sample photos are split as in ``compensation.py``: every 5th photo (100) calibrates the
original and is the only data the derived model is trained on, labels unused (the original is its teacher);
the other 400 score everything, once, with nothing chosen on them. Compared at equal MACs on those 400:

- the derived model (``dynavit derive``: the calibrated path ``--config``, compensation folded in) before
  training (what the path itself computes) and after ``--steps`` of distillation (``dynavit train
  --teacher``, temperature 1, the fit photos with the trainer's augmentation);
- the original's token-merge path (per-block keep rate) and ToMe's constant-r path whose MACs are the
  closest at or below the derived model's (a single config each, matched on MACs, not on accuracy).

Writes ``distil-deit`` (.md, .json) under benchmarks/results/:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distil_deit.py [--steps 300]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import torch
from docsection import write_json, write_section

import dynavit
from dynavit.assets import assets_dir
from dynavit.config import ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.data.datasets import read_image
from dynavit.data.files import list_images
from dynavit.deploy.derive import derive
from dynavit.sweep import Row, SweepTarget, stats
from dynavit.sweep.engine import device_name
from dynavit.train.recipes import TrainJob, run_job

ROOT = Path(__file__).resolve().parents[1]
TASK = "classification"


def split_folders(out: Path) -> tuple[Path, Path]:
    """``fit`` (every 5th photo) and ``test`` (the rest) as ImageNet-style folders of links."""
    src = assets_dir() / "imagenet-samples"
    photos = list_images(src / "images")
    for name, part in (("fit", photos[::5]), ("test", [p for i, p in enumerate(photos) if i % 5])):
        folder = out / name / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for p in part:
            if not (folder / p.name).exists():
                os.symlink(p.resolve(), folder / p.name)
        if not (out / name / "synset_words.txt").exists():
            os.symlink((src / "synset_words.txt").resolve(), out / name / "synset_words.txt")
    return out / "fit", out / "test"


def macs(dm: Any, cfg: ExecConfig) -> float:
    dm.configure(cfg)
    try:
        return float(sum(macs_per_image(dm, torch.randn(1, 3, *dm.input_size)).values()))
    finally:
        dm.configure()


def matched(dm: Any, target: float) -> dict[str, ExecConfig]:
    """The merge keep rate and the ToMe r with the most MACs at or below ``target``."""
    every = tuple(range(len(dm.module.blocks)))
    keeps = [ExecConfig(token_method="merge", token_keep=k / 1000, token_layers=every) for k in range(800, 1000, 5)]
    rs = [ExecConfig(token_method="merge", token_r=r) for r in range(1, 31)]
    out = {}
    for name, cands in (("merge keep rate", keeps), ("ToMe constant r", rs)):
        fit = [(macs(dm, c), c) for c in cands]
        out[name] = max((m, c) for m, c in fit if m <= target)[1] if any(m <= target for m, _ in fit) else None
    return {k: v for k, v in out.items() if v is not None}


def score(model: str, test: Path, cfgs: list[ExecConfig], calibration: str | None = None) -> list[Row]:
    target = SweepTarget(model=model, data=str(test), calibration=calibration, measure_latency=False)
    _, _, ev, _ = target.build(progress=True)
    return [ev.measure(c) for c in cfgs]


def record(r: Row, full: Row) -> dict[str, Any]:
    d = stats.paired_delta(r.per_image, full.per_image, TASK)
    return {"top1": r.quality, "ci": [r.quality_lo, r.quality_hi], "gmacs": r.macs / 1e9,
            "macs_saved": 1 - r.macs / full.macs, "delta": d[0], "delta_ci": [d[1], d[2]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default='{"mlp_width": 0.5}', help="the path whose structure is derived")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-distil")
    args = ap.parse_args()
    fit, test = split_folders(args.out)
    deit = str(assets_dir() / "models" / "deit-tiny-patch16-224")
    cal = args.out / "calibration"
    dm = dynavit.load(deit)
    if (cal / "calibration.json").is_file():
        dm.load_calibration(cal)
    else:
        dm.calibrate([read_image(p) for p in list_images(fit / "images")])
        dm.save_calibration(cal)
    cfg = ExecConfig.from_json(args.config)
    derived = derive(dm, cfg, args.out / "derived")
    t0 = time.perf_counter()
    model = run_job(TrainJob(model=str(derived), data=fit, out=args.out / "run", steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, warmup=20, teacher=deit, labels=False,
                             temperature=1.0))
    train_s = time.perf_counter() - t0
    budget = macs(dm, cfg)
    tokens = matched(dm, budget)
    orig = score(deit, test, [ExecConfig(), cfg, *tokens.values()], calibration=str(cal))
    full = orig[0]
    before, after = score(str(derived), test, [ExecConfig()])[0], score(str(model), test, [ExecConfig()])[0]
    res = {"machine": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
           "date": str(dt.date.today()), "config": cfg.to_dict(),
           "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "train_seconds": train_s,
           "full": record(full, full), "derived_before_training": record(before, full),
           "derived_distilled": record(after, full), "original_path": record(orig[1], full),
           "original_tokens": {f"{k}: {c.to_dict()}": record(r, full)
                               for (k, c), r in zip(tokens.items(), orig[2:], strict=True)}}
    write_json("distil-deit", res)
    body = section(args, res)
    write_section("distil-deit", "Variants: a derived, distilled DeiT-tiny against the original's paths", body)
    print(body)


def _line(name: str, r: dict[str, Any]) -> str:
    return (f"| {name} | {r['gmacs']:.3f} | {100 * r['macs_saved']:.1f} % | {100 * r['top1']:.2f} "
            f"[{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}] | {100 * r['delta']:+.2f} "
            f"[{100 * r['delta_ci'][0]:+.2f}, {100 * r['delta_ci'][1]:+.2f}] |")


def section(args: argparse.Namespace, res: dict[str, Any]) -> str:
    lines = [f"Machine: {res['machine']}; {res['date']}; command: `OMP_NUM_THREADS={res['threads']} .venv/bin/python "
             f"benchmarks/distil_deit.py --steps {args.steps}`; raw output in `benchmarks/results/distil-deit.json`.",
             "", "Quality only (no timing), so the run shared the machine with other work.", "",
             f"DeiT-tiny; derived from the path `{res['config']}`; distilled for {res['steps']} steps of "
             f"{res['batch_size']} augmented crops of the 100 fit photos, labels unused "
             f"({res['train_seconds'] / 60:.1f} min); everything scored once on the 400 other photos.", "",
             "| model / path | GMACs | MACs saved | top-1 % [95% CI] | Δ vs full [paired 95% CI] |",
             "|---|---|---|---|---|", _line("full DeiT-tiny", res["full"]),
             _line("derived, before training (= the original's path)", res["derived_before_training"]),
             _line("derived, distilled", res["derived_distilled"]),
             *[_line(f"original, {k}", r) for k, r in res["original_tokens"].items()], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
