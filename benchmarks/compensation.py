"""Training-free compensation: resilience curves before/after, and a composed path chosen held out.

DeiT-tiny, calibrated twice on the same 100 ImageNet sample photographs (every 5th): once
without compensation (``compensate=False``: the knobs as they were) and once with it (the method
the calibration's own held-out quarter chose). Every number below is measured on the other 400
photographs, which neither calibration saw (the evaluator leaves calibration images out by hash).

1. Resilience per knob (MLP width, heads, skipped blocks / attention / MLP sub-layers in each
   calibration's order, and in the order of their single-skip KL for comparison): top-1 before and
   after, one figure.
2. The path with >= 35 % fewer MACs (compensated model): a grid of composed paths (resolution, MLP
   width, token merge, skipped attention) filtered to 35-41 % fewer MACs, measured on all 400 images;
   the most accurate is CHOSEN on one half of them and REPORTED on the other half
   (``pareto.confirmed_best``), with its paired delta to the full model and a bootstrap CI.
3. ``--crossfit``: two-fold cross-fitting on all 500 photos. The photos are split into two interleaved
   halves; each half is scored by compensated calibrations made on 100 (and on all 250) photos of
   the other half, and the per-photo results of both folds are pooled: every photo is scored once,
   by a calibration that never saw it. Less tied to one split than part 1, and it shows what more
   calibration images buy.
4. ``--ridges``: on the same compensated calibration and 400 photos, each group's chosen ridge
   (MLPs, attention projections) against the default one, paired (heads 2 of 3, MLP width 0.75).
5. ``--camvid``: the committed CamVid SegFormer-B0, calibrated (with compensation) on 64 CamVid
   train images; its MLP width, decoder width and dropped decoder branch knobs with the corrections
   switched off and on, on the 101 val images (mIoU).

Writes benchmarks/results/compensation-cpu.json (a part not asked for this time keeps its earlier
result there, with the date it was measured) and docs/img/compensation_deit.png:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compensation.py [--crossfit] [--ridges] [--camvid] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from docsection import command, machine

import dynavit
from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.data import open_dataset
from dynavit.data.datasets import file_sha1, list_images, read_image
from dynavit.knobs import compensate
from dynavit.sweep import SweepTarget, stats
from dynavit.sweep.engine import Evaluator, cache_dataset
from dynavit.sweep.pareto import confirmed_best

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MLP = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.25)
SKIPS = 5  # up to this many blocks / sub-layers removed


def calibrate(model: str, images: list, hashes: list[str], folder: Path, comp: bool) -> tuple[Path, float]:
    """A calibration folder (reused when present) and the seconds it took to make."""
    if not (folder / "calibration.json").is_file():
        dm = dynavit.load(model)
        cal = dm.calibrate(images, compensate=comp, progress=True)
        cal.image_hashes = hashes
        dm.save_calibration(folder)
    return folder, json.loads((folder / "calibration.json").read_text())["seconds"]


def curves(ev, dm, task: str) -> dict[str, list[dict]]:
    """Quality along each single knob, skips in the calibration's own order."""
    if task == "segmentation":  # the decoder and MLP width knobs (a SegFormer evaluation is slow on a CPU)
        n = dm.space.decoder_branches
        return {"mlp_width": [_point(ev, ExecConfig(mlp_width=w), task, w) for w in (1.0, 0.75, 0.5)],
                "decoder_width": [_point(ev, ExecConfig(decoder_width=w), task, w) for w in (0.5, 0.25)],
                "decoder_branch_dropped": [_point(ev, ExecConfig(decoder_branches=tuple(j for j in range(n) if j != i)),
                                                  task, i) for i in range(n)]}
    cal = dm.calibration
    out: dict[str, list[dict]] = {"mlp_width": [], "heads": []}
    for w in MLP:
        out["mlp_width"].append(_point(ev, ExecConfig(mlp_width=w), task, w))
    for h in range(dm.space.heads[0], 0, -1):
        out["heads"].append(_point(ev, ExecConfig(heads=h), task, h))
    for kind, key in (("block", "skip_blocks"), ("attn", "skip_attn"), ("mlp", "skip_mlp")):
        single = sorted(range(len(cal.block_kl[kind])), key=cal.block_kl[kind].__getitem__)
        for name, order in ((key, cal.block_order(kind)), (f"{key} (single-skip order)", single)):
            out[name] = [_point(ev, ExecConfig(**{key: tuple(order[:n])}), task, n) for n in range(0, SKIPS + 1)]
    return out


class Cached:
    """An evaluator whose measurements are kept in a file, so a rerun resumes where one stopped."""

    def __init__(self, ev, path: Path) -> None:
        self.ev, self.path = ev, path
        self.rows = {}
        if path.is_file():
            self.rows = {json.dumps(c, sort_keys=True): r for c, r in pickle.loads(path.read_bytes())}

    def measure(self, cfg: ExecConfig):
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in self.rows:
            self.rows[key] = self.ev.measure(cfg)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps([(json.loads(k), r) for k, r in self.rows.items()]))
            tmp.replace(self.path)
        return self.rows[key]


def _point(ev, cfg: ExecConfig, task: str, x: float) -> dict:
    """One path's quality with its interval, and its paired difference to the full path on the same images."""
    r, full = ev.measure(cfg), ev.measure(ExecConfig())
    lo, hi = stats.interval(r.per_image, task)
    d, dlo, dhi = stats.paired_delta(r.per_image, full.per_image, task)
    return {"x": x, "config": cfg.to_dict(), "quality": round(100 * r.quality, 2),
            "ci": [round(100 * lo, 2), round(100 * hi, 2)], "delta": round(100 * d, 2),
            "delta_ci": [round(100 * dlo, 2), round(100 * dhi, 2)], "gmacs": round(r.macs / 1e9, 4), "_row": r}


def composed_grid(dm, attn_order: list[int], lo: float = 0.35, hi: float = 0.41) -> list[ExecConfig]:
    """Composed DeiT paths whose MAC saving is within [lo, hi]."""
    x = dm.example_input()
    full = _macs(dm, ExecConfig(), x)
    merge = ({"token_method": "merge", "token_keep": k, "token_layers": tuple(range(12))} for k in (.95, .93, .9))
    tokens = [{}, *merge, *({"token_method": "merge", "token_r": r} for r in (8, 11))]
    grid = []
    for res, w, tok, skip in itertools.product((224, 208, 192), (1.0, 0.9, 0.75), tokens, ((), (attn_order[0],))):
        cfg = ExecConfig(resolution=None if res == 224 else res, mlp_width=w, skip_attn=skip, **tok)
        if lo <= 1 - _macs(dm, cfg, x) / full <= hi:
            grid.append(cfg)
    return grid


def _macs(dm, cfg: ExecConfig, x: torch.Tensor) -> float:
    dm.configure(cfg)
    with torch.no_grad():
        return sum(macs_per_image(dm.module, x).values())


def chosen(ev, dm, grid: list[ExecConfig], task: str) -> dict:
    full = ev.measure(ExecConfig())
    rows = [ev.measure(c) for c in grid]
    best = confirmed_best(rows, lambda r: r.macs <= 0.65 * full.macs, reference=full, task=task)
    return {"candidates": len(rows), "config": best.row.config.to_dict(),
            "mac_saving_pct": round(100 * (1 - best.row.macs / full.macs), 1),
            "quality_on_choosing_half": round(100 * best.selected_quality, 2),
            "quality_held_out": round(100 * best.quality, 2), "ci": [round(100 * best.quality_lo, 2),
                                                                    round(100 * best.quality_hi, 2)],
            "full_held_out": round(100 * stats.point(full.per_image[best.confirm_idx], task), 2),
            "delta_pts": round(100 * best.delta, 2), "delta_ci": [round(100 * best.delta_lo, 2),
                                                                 round(100 * best.delta_hi, 2)],
            "images_choose": best.n_select, "images_report": best.n_confirm}


def study(model: str, data: Path, calib_images: list, hashes: list[str], out: Path, task: str,
          compose: bool) -> dict:
    """Both calibrations, their curves (and the composed choice, compensated) on the images neither saw."""
    result: dict = {}
    for name, comp in (("plain", False), ("compensated", True)):
        folder, seconds = calibrate(model, calib_images, hashes, out / f"calibration-{name}", comp)
        dm, ds, ev, excluded = _target(model, data, folder).build()
        dm.eval()
        ev = Cached(ev, out / f"rows-{name}.pkl")
        part = {"calibration_seconds": round(seconds, 1), **_summary(dm), "scored_images": ds.n,
                "calibration_images_left_out": excluded, "curves": curves(ev, dm, task)}
        if compose and comp:
            part["composed_35"] = chosen(ev, dm, composed_grid(dm, dm.calibration.block_order("attn")), task)
        result[name] = part
    return _clean(result)


def toggled(model: str, data: Path, calib_images: list, hashes: list[str], out: Path, task: str) -> dict:
    """One compensated calibration, its knobs with the corrections switched off, then on (same unit order)."""
    folder, seconds = calibrate(model, calib_images, hashes, out / "calibration-compensated", True)
    result: dict = {}
    for name in ("off", "on"):
        dm, ds, ev, excluded = _target(model, data, folder, reuse_prefix=False).build()
        dm.eval()
        comp = dm.calibration.compensation
        if name == "off":
            comp.install(dm.module, method="none", skip_means=False, branch_fix=False)
        ev = Cached(ev, out / f"rows-{name}.pkl")
        result[name] = {"calibration_seconds": round(seconds, 1), **_summary(dm), "scored_images": ds.n,
                        "calibration_images_left_out": excluded, "curves": curves(ev, dm, task)}
    return _clean(result)


def _target(model: str, data: Path, folder: Path, reuse_prefix: bool = True) -> SweepTarget:
    return SweepTarget(model=model, data=str(data), calibration=str(folder), measure_latency=False, batch_size=25,
                       reuse_prefix=reuse_prefix)


def _summary(dm) -> dict:
    c = dm.calibration.compensation
    out = {"criterion": dm.calibration.criterion, "criteria_kl": dm.calibration.comparison,
           "method": None if c is None else c.method, "skip_means": None if c is None else c.skip_means,
           "methods_kl": None if c is None else c.comparison}
    if c is not None:
        out["statistics_bytes"] = compensate.held_bytes(dm.module)["statistics"]
    return out


def _clean(result: dict) -> dict:
    for part in result.values():
        for points in part["curves"].values():
            for p in points:
                p.pop("_row")
    return result


def deit(out: Path) -> dict:
    photos = list_images(assets_dir() / "imagenet-samples" / "images")[::5]
    return study(str(deit_tiny_source()), assets_dir() / "imagenet-samples", [read_image(p) for p in photos],
                 [file_sha1(p) for p in photos], out / "deit", "classification", compose=True)


CROSSFIT = [ExecConfig(), *(ExecConfig(mlp_width=w) for w in MLP[1:5]), ExecConfig(heads=2)]


def crossfit(out: Path, sizes: tuple[int, ...] = (100, 250)) -> dict:
    """Two folds of the 500 photos; each scored by calibrations of ``sizes`` photos from the other fold, pooled."""
    ds = open_dataset(assets_dir() / "imagenet-samples")
    folds = [list(range(0, len(ds), 2)), list(range(1, len(ds), 2))]
    result: dict = {"folds": [len(f) for f in folds]}
    for size in sizes:
        hits: dict[str, list[np.ndarray]] = {}
        part: dict = {"calibration_seconds": []}
        for f, own in enumerate(folds):
            pick = [own[i * len(own) // size] for i in range(size)]
            folder, seconds = calibrate(str(deit_tiny_source()), [ds.load(i)[0] for i in pick],
                                        [file_sha1(ds.path(i)) for i in pick], out / f"crossfit-{size}-{f}", True)
            part["calibration_seconds"].append(round(seconds, 1))
            dm = dynavit.load(str(deit_tiny_source()))
            dm.load_calibration(folder)
            dm.eval()
            ev = Evaluator(dm, cache_dataset(dm, ds.subset(folds[1 - f]), batch_size=25, progress=False),
                           measure_latency=False)
            for cfg in CROSSFIT:
                hits.setdefault(json.dumps(cfg.to_dict()), []).append(ev.measure(cfg).per_image)
        full = np.concatenate(hits[json.dumps({})])
        for key, parts in hits.items():
            per = np.concatenate(parts)
            d, lo, hi = stats.paired_delta(per, full, "classification")
            part[key] = {"top1": round(100 * stats.point(per, "classification"), 2), "delta": round(100 * d, 2),
                         "delta_ci": [round(100 * lo, 2), round(100 * hi, 2)], "images": len(per)}
        result[f"calibrated_on_{size}"] = part
    return result


def ridges(out: Path) -> dict:
    """Each group's chosen ridge against the default, same calibration and unseen photos, paired."""
    folder = out / "deit" / "calibration-compensated"
    dm, _, ev, _ = _target(str(deit_tiny_source()), assets_dir() / "imagenet-samples", folder, False).build()
    dm.eval()
    comp = dm.calibration.compensation
    chosen = dict(comp.ridges)
    result: dict = {"chosen": chosen, "default": compensate.RIDGE}
    for group, cfg in (("heads", ExecConfig(heads=2)), ("mlp", ExecConfig(mlp_width=0.75))):
        per = {}
        for name, ridge in (("chosen", chosen[group]), ("default", compensate.RIDGE)):
            comp.ridges = {**chosen, group: ridge}
            comp.install(dm.module)
            per[name] = ev.measure(cfg, latency=False).per_image
        d, lo, hi = stats.paired_delta(per["chosen"], per["default"], "classification")
        result[group] = {"config": cfg.to_dict(), "images": len(per["chosen"]),
                         **{f"top1_{k}": round(100 * stats.point(v, "classification"), 2) for k, v in per.items()},
                         "delta": round(100 * d, 2), "delta_ci": [round(100 * lo, 2), round(100 * hi, 2)]}
    comp.ridges = chosen
    comp.install(dm.module)
    return result


def camvid(out: Path) -> dict:
    train = open_dataset(assets_dir() / "camvid" / "train")
    idx = list(range(0, len(train), 6))[:64]
    return toggled(str(ROOT / "models" / "segformer-b0-camvid"), assets_dir() / "camvid" / "val",
                   [train.load(i)[0] for i in idx], [file_sha1(train.path(i)) for i in idx], out / "camvid",
                   "segmentation")


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = ("mlp_width", "heads", "skip_blocks", "skip_attn", "skip_mlp")
    fig, axes = plt.subplots(1, len(knobs), figsize=(4 * len(knobs), 3.4), sharey=True)
    for ax, knob in zip(axes, knobs, strict=True):
        for name, style in (("plain", "o--"), ("compensated", "s-")):
            pts = result["deit"][name]["curves"][knob]
            ax.plot([p["x"] for p in pts], [p["quality"] for p in pts], style, label=name)
        single = result["deit"]["compensated"]["curves"].get(f"{knob} (single-skip order)")
        if single:
            ax.plot([p["x"] for p in single], [p["quality"] for p in single], "^:",
                    label="compensated, single-skip order")
        ax.set_title(knob)
        ax.set_xlabel("kept fraction" if knob == "mlp_width" else "heads" if knob == "heads" else "removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 % (400 unseen photos)")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("DeiT-tiny, training-free knobs: without and with compensation; skips in composed and single order")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-comp")
    ap.add_argument("--camvid", action="store_true", help="also the CamVid SegFormer's knobs")
    ap.add_argument("--crossfit", action="store_true", help="also DeiT-tiny cross-fitted on all 500 photos")
    ap.add_argument("--ridges", action="store_true", help="also each group's chosen ridge against the default")
    args = ap.parse_args()
    t0 = time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "compensation-cpu.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    result = {"command": command(), "date": str(dt.date.today()), "deit": deit(args.out)}
    figure(result, ROOT / "docs" / "img" / "compensation_deit.png")
    parts = {"deit_crossfit": crossfit, "deit_ridges": ridges, "camvid": camvid}
    wanted = (("deit_crossfit", args.crossfit), ("deit_ridges", args.ridges), ("camvid", args.camvid))
    for name in [n for n, on in wanted if on]:
        path.write_text(json.dumps({**result, "machine": machine()}, indent=1) + "\n")
        result[name] = parts[name](args.out)
    for name, on in wanted:  # a part not run this time keeps its earlier measurement, with that run's date
        if not on and name in earlier:
            result[name] = {**earlier[name], "measured": earlier[name].get("measured", earlier.get("date"))}
    result["seconds"] = round(time.perf_counter() - t0)
    result["machine"] = machine()
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:6000])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
