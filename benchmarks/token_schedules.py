"""Token schedules for DeiT-tiny at matched MACs: which way of removing tokens loses least.

Schedules (``ExecConfig`` token fields; see ``dynavit.knobs.tokens``):

- merge keep @all: ToMe merging, a keep rate at every block (``token_keep``);
- merge r (ToMe): ToMe's own schedule, a constant r tokens merged at every block (``token_r``);
- prune r: EViT pruning of the r least-attended tokens at every block;
- prune+merge r: at every block, prune ceil(r/2) least-attended tokens, then merge r//2 pairs;
- prune keep @3,6,9 (EViT): EViT's placement and keep rate;
- merge similar, step s (ATM): per image, every pair more similar than a threshold merges, the
  threshold falling by s per block (``token_threshold``, ``token_threshold_step``); s = 0, 0.01, 0.02.

For each MAC saving (25 %, 35 %, 44 %) every schedule is set to the mildest setting that saves at
least that much (MACs counted exactly, one image; keep rates in steps of 0.005 / 0.01, r in steps
of 1, thresholds in steps of 0.005, so the savings land within about a point of each other). A
per-image schedule's MACs differ per image: its setting is matched on the mean over the 100
calibration photographs, and its row reports the mean over the 400 scored ones. Calibration on
100 of the 500 ImageNet sample photographs (every 5th, as benchmarks/sweep_deit.py), the other
400 scored. The schedule for a
saving is chosen on one half of the 400 (``confirmed_best``) and scored on the other half: top-1
with its exact interval and the paired delta against the full model, bootstrap 95 % CI. Accuracy
and MACs only: no timing.

Writes benchmarks/results/token_schedules-cpu.json and token-schedules.md. Run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/token_schedules.py [--out out/bench-tokens]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from docsection import write_json, write_section
from sweep_deit import calibrate

from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.cost import total_macs
from dynavit.data.datasets import list_images, read_image
from dynavit.sweep import SweepTarget, stats
from dynavit.sweep.pareto import confirmed_best

ROOT = Path(__file__).resolve().parents[1]
SAVINGS = (0.25, 0.35, 0.44)
ALL = tuple(range(12))
REFERENCE = "merge keep @all"  # the per-block keep rate the schedules are compared with
FAMILIES = {  # name -> (parameter values, mildest first; config of a value)
    "merge keep @all": ([round(1 - i / 200, 3) for i in range(1, 41)],
                        lambda k: ExecConfig(token_method="merge", token_keep=k, token_layers=ALL)),
    "merge r (ToMe)": (list(range(1, 31)), lambda r: ExecConfig(token_method="merge", token_r=r)),
    "prune r": (list(range(1, 31)), lambda r: ExecConfig(token_method="prune", token_r=r)),
    "prune+merge r": (list(range(1, 31)), lambda r: ExecConfig(token_method="prune+merge", token_r=r)),
    "prune keep @3,6,9 (EViT)": ([round(1 - i / 100, 2) for i in range(1, 71)],
                                 lambda k: ExecConfig(token_method="prune", token_keep=k)),
    **{f"merge similar, step {step} (ATM)": (
        [round(1 - i / 200, 3) for i in range(1, 61)],
        lambda t, step=step: ExecConfig(token_method="merge", token_threshold=t, token_threshold_step=step))
       for step in (0.0, 0.01, 0.02)},
}


def mean_macs(dm, images: torch.Tensor) -> float:
    """MACs of the configured path, one image at a time, averaged over ``images``."""
    return sum(total_macs(dm.module, lambda im=im: dm(im[None])) for im in images) / len(images)


def matched(dm, x, photos, base_macs: int) -> dict[float, dict[str, ExecConfig]]:
    """Per saving, per schedule: the mildest setting with at least that MAC saving (``x``: one image;
    ``photos``: the calibration images, over which a per-image schedule's MACs are averaged)."""
    out: dict[float, dict[str, ExecConfig]] = {s: {} for s in SAVINGS}
    for name, (values, make) in FAMILIES.items():
        for v in values:
            dm.configure(make(v))
            saving = 1 - mean_macs(dm, photos if make(v).token_threshold is not None else x) / base_macs
            for s in SAVINGS:
                if saving >= s and name not in out[s]:
                    out[s][name] = make(v)
            if all(name in out[s] for s in SAVINGS):
                break
    dm.configure(ExecConfig())
    return out


def held_out(row, base, idx: np.ndarray) -> dict:
    """Top-1 and the paired delta against the full model on the images ``idx``."""
    top1 = stats.point(row.per_image[idx], "classification")
    lo, hi = stats.interval(row.per_image[idx], "classification")
    d, dlo, dhi = stats.paired_delta(row.per_image[idx], base.per_image[idx], "classification")
    return {"top1": round(100 * top1, 2), "top1_ci": [round(100 * lo, 2), round(100 * hi, 2)],
            "delta_pts": round(100 * d, 2), "delta_ci": [round(100 * dlo, 2), round(100 * dhi, 2)]}


def table(levels: list[dict], full: dict, n_pick: int, n_score: int) -> str:
    lines = [f"Each schedule at the mildest setting that saves at least the MAC share (DeiT-tiny, "
             f"{full['gmacs']} GMACs and {full['top1_all']} % top-1 on all {n_pick + n_score} scored images, "
             f"{full['top1_held_out']} % on the held-out half; exact MACs). Top-1 on the {n_pick} choosing images, "
             f"then top-1 [exact 95 % CI] and Δ against the full model [paired bootstrap 95 % CI] on the other "
             f"{n_score}. ✓ = the schedule chosen for that saving on the choosing half. The last column compares "
             f"schedules (no choice made) on all {n_pick + n_score} images, paired, against {REFERENCE}.", "",
             "| MACs saved ≥ | schedule | setting | MACs saved | top-1 % choosing half | top-1 % held out | "
             f"Δ pts held out | Δ pts vs {REFERENCE}, all images |", "|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        for s in lv["schedules"]:
            h = s["held_out"]
            mark = " ✓" if s["name"] == lv["chosen"] else ""
            lines.append(f"| {round(100 * lv['saving'])} % | {s['name']}{mark} | {s['setting']} | "
                         f"{s['mac_saving_pct']:.1f} % | {s['top1_choosing']:.1f} | {h['top1']:.1f} "
                         f"[{h['top1_ci'][0]:.1f}, {h['top1_ci'][1]:.1f}] | {h['delta_pts']:+.1f} "
                         f"[{h['delta_ci'][0]:+.1f}, {h['delta_ci'][1]:+.1f}] | {_delta(s['vs_reference_all'])} |")
    return "\n".join(lines)


def _delta(d: dict) -> str:
    return f"{d['delta_pts']:+.2f} [{d['delta_ci'][0]:+.1f}, {d['delta_ci'][1]:+.1f}]"


def paired(row, ref) -> dict:
    """Paired delta of ``row`` against ``ref`` on every scored image."""
    d, lo, hi = stats.paired_delta(row.per_image, ref.per_image, "classification")
    return {"delta_pts": round(100 * d, 2), "delta_ci": [round(100 * lo, 2), round(100 * hi, 2)]}


def level(saving: float, configs: dict[str, ExecConfig], rows: dict, ev, base, pick: np.ndarray,
          score: np.ndarray, macs: dict[ExecConfig, float]) -> dict:
    """One MAC saving: every schedule measured, the best chosen on ``pick`` and scored on ``score``
    (``macs``: per-image paths' mean MACs over the scored images)."""
    measured = []
    for name, cfg in configs.items():
        if cfg not in rows:
            rows[cfg] = ev.measure(cfg, label=name)
        measured.append((name, cfg, rows[cfg]))
    chosen = confirmed_best([r for _, _, r in measured], lambda r: True, reference=base)
    assert np.array_equal(chosen.confirm_idx, score)
    ref = rows[configs[REFERENCE]]
    schedules = [{"name": name, "config": cfg.to_dict(),
                  "setting": ", ".join(f"{k.removeprefix('token_')}={v}" for k, v in cfg.to_dict().items()
                                       if k != "token_layers"),
                  "gmacs": round(macs.get(cfg, r.macs) / 1e9, 4),
                  "mac_saving_pct": round(100 * (1 - macs.get(cfg, r.macs) / base.macs), 2),
                  "top1_choosing": round(100 * stats.point(r.per_image[pick], "classification"), 2),
                  "held_out": held_out(r, base, score), "vs_reference_all": paired(r, ref),
                  "top1_all": round(100 * r.quality, 2), "vs_full_all": paired(r, base)} for name, cfg, r in measured]
    return {"saving": saving, "chosen": next(n for n, _, r in measured if r is chosen.row), "schedules": schedules}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-tokens")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shared = ROOT / "out" / "bench-sweep" / "calibration"  # the same 100 images: reuse when there
    if (shared / "calibration.json").is_file() and not (args.out / "calibration").exists():
        shutil.copytree(shared, args.out / "calibration")
    calib = calibrate(args.out)
    target = SweepTarget(model=str(deit_tiny_source()), data=str(assets_dir() / "imagenet-samples"),
                         calibration=str(calib), measure_latency=False, batch_size=50)
    dm, data, ev, excluded = target.build()
    dm.eval()
    x = dm.example_input(1)
    files = list_images(assets_dir() / "imagenet-samples" / "images")
    photos = torch.stack([dm.transform(read_image(p)) for p in files[::5]])  # the calibration's
    base = ev.measure(ExecConfig(), label="default")
    configs = matched(dm, x, photos, base.macs)
    scored = torch.stack([dm.transform(read_image(p)) for i, p in enumerate(files) if i % 5])
    per_image = {c for by in configs.values() for c in by.values() if c.token_threshold is not None}
    macs = {}
    for c in per_image:
        dm.configure(c)
        macs[c] = mean_macs(dm, scored)
    dm.configure(ExecConfig())
    rows = {}
    pick, score = stats.split_images(len(base.per_image))
    levels = [level(s, configs[s], rows, ev, base, pick, score, macs) for s in SAVINGS]
    k90 = ev.measure(FAMILIES[REFERENCE][1](0.9), label="merge keep 0.90 @all")  # the usual keep-rate setting
    keep90 = {"mac_saving_pct": round(100 * (1 - k90.macs / base.macs), 2), "top1_all": round(100 * k90.quality, 2),
              "vs_full_all": paired(k90, base)}
    full = {"gmacs": round(base.macs / 1e9, 4), "top1_all": round(100 * base.quality, 2),
            "top1_held_out": round(100 * stats.point(base.per_image[score], "classification"), 2)}
    payload = {"model": "DeiT-tiny (facebook/deit-tiny-patch16-224)", "calibration_images": excluded,
               "scored_images": data.n, "choosing_images": len(pick), "held_out_images": len(score),
               "full_model": full,
               "levels": levels, "merge keep 0.90 @all": keep90, "seconds": round(time.perf_counter() - t0)}
    print(write_json("token_schedules-cpu", payload))
    ref44 = levels[-1]["schedules"][0]  # merge keep @all at the largest saving
    body = table(levels, full, len(pick), len(score)) + (
        f"\n\nNeighbouring settings: merge keep 0.90 @all saves {keep90['mac_saving_pct']:.1f} % at Δ "
        f"{_delta(keep90['vs_full_all'])} pts on all {data.n} images, against "
        f"{ref44['vs_full_all']['delta_pts']:+.2f} for keep {ref44['config']['token_keep']} at "
        f"{ref44['mac_saving_pct']:.1f} %: differences of 1-2 points between schedules are within what one step "
        "of a setting moves.")
    print(body)
    print(write_section("token-schedules", "Token schedules for DeiT-tiny at matched MACs", body))


if __name__ == "__main__":
    main()
