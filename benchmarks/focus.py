"""Token-focused MLP width (``knobs.focus``): DeiT-tiny cross-fitted on all 500 photos, per focus fraction.

The photos split into two interleaved halves; each half is scored by compensated calibrations made
on 100 (and on 250) photos of the other half (the folders ``compensation.py --crossfit`` makes, reused
when present), and the per-photo results of both halves are pooled: every photo is scored once by a
calibration that never saw it. For each MLP width: every fixed fraction (no focus: every token
narrowed alike; the class token only; 8 / 16 / 25 % of the patch tokens by the class token's
attention), and the fractions each calibration chose per width on its own held-out quarter
("calibrated", what ``dm.calibrate`` ships). MACs are counted on one photo.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/focus.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from compensation import calibrate
from docsection import command, machine

import dynavit
from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.compensation import install_focus
from dynavit.config import ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.data import open_dataset
from dynavit.data.datasets import file_sha1
from dynavit.sweep import stats
from dynavit.sweep.engine import cache_dataset

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (None, 0.0, 0.08, 0.16, 0.25, "calibrated")
WIDTHS = (0.9, 0.75, 0.6, 0.5)


def _logits(dm, data, cfg: ExecConfig) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        return torch.cat([dm(b) for b in data.batches])


def _fold(dm, data) -> dict:
    """Per (fraction, width): hits and per-photo KL to the full path on ``data``; MACs on its first photo."""
    comp, labels = dm.calibration.compensation, torch.cat(data.targets)
    ref = _logits(dm, data, ExecConfig())
    out: dict = {"full": (ref.argmax(-1) == labels).numpy().astype(float), "chosen": comp.focus}
    for f in FRACTIONS:
        install_focus(dm.module, comp.focus if f == "calibrated" else None if f is None else ((1.0, f),))
        for w in WIDTHS:
            got = _logits(dm, data, ExecConfig(mlp_width=w))
            kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            with torch.no_grad():
                macs = sum(macs_per_image(dm.module, data.batches[0][:1]).values())
            out[(f, w)] = ((got.argmax(-1) == labels).numpy().astype(float), kl.numpy(), macs)
    comp.install(dm.module)
    return out


def crossfit(out: Path, sizes: tuple[int, ...] = (100, 250)) -> dict:
    ds = open_dataset(assets_dir() / "imagenet-samples")
    folds = [list(range(0, len(ds), 2)), list(range(1, len(ds), 2))]
    result: dict = {}
    for size in sizes:
        parts = []
        for f, own in enumerate(folds):
            pick = [own[i * len(own) // size] for i in range(size)]
            folder, _ = calibrate(str(deit_tiny_source()), [ds.load(i)[0] for i in pick],
                                  [file_sha1(ds.path(i)) for i in pick], out / f"crossfit-{size}-{f}", True)
            dm = dynavit.load(str(deit_tiny_source()))
            dm.load_calibration(folder)
            dm.eval()
            parts.append(_fold(dm, cache_dataset(dm, ds.subset(folds[1 - f]), batch_size=25, progress=False)))
        full = np.concatenate([p["full"] for p in parts])
        rows = []
        for w in WIDTHS:
            for frac in FRACTIONS:
                hits = np.concatenate([p[(frac, w)][0] for p in parts])
                d, lo, hi = stats.paired_delta(hits[:, None], full[:, None], "classification")
                rows.append({"mlp_width": w, "focus": frac, "top1": round(100 * hits.mean(), 2),
                             "delta": round(100 * d, 2), "delta_ci": [round(100 * lo, 2), round(100 * hi, 2)],
                             "kl": round(float(np.concatenate([p[(frac, w)][1] for p in parts]).mean()), 4),
                             "gmacs": round(parts[0][(frac, w)][2] / 1e9, 6)})
        result[f"calibrated_on_{size}"] = {"full_top1": round(100 * full.mean(), 2), "images": len(full),
                                           "chosen": [p["chosen"] for p in parts], "rows": rows}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-comp")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"command": command(), "date": str(dt.date.today()), "crossfit": crossfit(args.out)}
    result["seconds"] = round(time.perf_counter() - t0)
    result["machine"] = machine()
    path = ROOT / "benchmarks" / "results" / "focus-cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for size, part in result["crossfit"].items():
        print(size, "full", part["full_top1"], "chosen", part["chosen"])
        for r in part["rows"]:
            print(f"  width {r['mlp_width']} focus {r['focus']}: {r['top1']} {r['delta']:+} {r['delta_ci']} "
                  f"KL {r['kl']} GMACs {r['gmacs']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
