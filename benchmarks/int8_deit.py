"""int8 DeiT-tiny on CPU: accuracy on held-out photographs, throughput at batch 32, composed paths.

1. Calibrate DeiT-tiny on 100 of the 500 ImageNet sample photographs (every 5th, as the sweep
   benchmark does); score every path on the other 400 (the evaluator leaves the calibration's
   images out by content hash). int8 needs no calibration data of its own: its activation
   scales are taken at run time.
2. The linear-layer kernels on DeiT-tiny's MLP shapes (fp32 ``F.linear``, fbgemm's
   ``quantized::linear_dynamic``, ``torch._int_mm`` with the quantization written in PyTorch).
3. A few composed paths in fp32 and int8: top-1 and the paired delta against fp32 default, MACs,
   and batch-32 throughput / batch-1 latency timed interleaved round-robin (every repetition
   times every path once, so the shared machine's load hits all alike); medians and ratios.

Writes benchmarks/results/int8_deit-cpu.json. Run with 2 threads:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/int8_deit.py [--reps 15] [--out out/bench-int8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_paths import time_round_robin
from sweep_deit import calibrate

from dynavit.assets import assets_dir, deit_tiny_source
from dynavit.config import ExecConfig
from dynavit.knobs import quant
from dynavit.sweep import SweepTarget, stats

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {
    "default": {},
    "mlp 0.8": {"mlp_width": 0.8},
    "merge 0.93 @all": {"token_method": "merge", "token_keep": 0.93, "token_layers": tuple(range(12))},
    "resolution 192": {"resolution": 192},
    "mlp 0.8 + merge 0.93": {"mlp_width": 0.8, "token_method": "merge", "token_keep": 0.93,
                             "token_layers": tuple(range(12))},
    "mlp 0.7 + heads 2 + prune 0.8 + res 192": {"mlp_width": 0.7, "heads": 2, "token_keep": 0.8,
                                                "resolution": 192},
}


def kernels(reps: int) -> dict[str, dict[str, float]]:
    """GOP/s of one linear layer (DeiT-tiny fc1 and fc2 at batch 32) per kernel, timed interleaved."""
    out = {}
    for name, (k, n) in {"fc1 192->768": (192, 768), "fc2 768->192": (768, 192)}.items():
        g = torch.Generator().manual_seed(0)
        x, lin = torch.randn(32 * 197, k, generator=g), torch.nn.Linear(k, n)
        q = quant.LowPrecision(quant._version(lin))
        packed = quant._pack(lin, q, 0, n, k)
        wt, s = q.qweight.t(), q.scale.float()

        def int_mm(x=x, wt=wt, s=s, b=lin.bias):
            sx = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
            y = torch._int_mm((x / sx).round_().to(torch.int8), wt).float()
            return y.mul_(sx).mul_(s).add_(b)

        t = time_round_robin({"fp32 F.linear": lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias),
                              "int8 quantized::linear_dynamic (used)":
                                  lambda x=x, p=packed: torch.ops.quantized.linear_dynamic(x, p, quant.REDUCE_RANGE),
                              "int8 torch._int_mm + PyTorch quantization": int_mm}, reps)
        out[name] = {kernel: round(2 * x.shape[0] * k * n / sec / 1e9, 1) for kernel, sec in t.items()}
    return out


def accuracy(ev, cfgs: dict[str, ExecConfig]) -> dict[str, dict]:
    """Top-1 on the scored images, and the paired delta (bootstrap CI) against the first config."""
    measured = {label: ev.measure(cfg) for label, cfg in cfgs.items()}
    base = next(iter(measured.values()))
    rows = {}
    for label, r in measured.items():
        d, lo, hi = stats.paired_delta(r.per_image, base.per_image, "classification")
        rows[label] = {"config": cfgs[label].to_dict(), "top1": round(100 * r.quality, 2),
                       "delta_pts": round(100 * d, 2), "delta_ci": [round(100 * lo, 2), round(100 * hi, 2)],
                       "gmacs": round(r.macs / 1e9, 4)}
    return rows


def timing(dm, cfgs: dict[str, ExecConfig], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds per path on ``x``, interleaved round-robin."""
    def runner(cfg: ExecConfig):
        return lambda: dm.configure(cfg)(x)

    with torch.inference_mode():
        return time_round_robin({k: runner(c) for k, c in cfgs.items()}, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "out" / "bench-int8")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    calib = calibrate(args.out)
    target = SweepTarget(model=str(deit_tiny_source()), data=str(assets_dir() / "imagenet-samples"),
                         calibration=str(calib), measure_latency=False, batch_size=50)
    dm, data, ev, excluded = target.build()
    dm.eval()
    cfgs = {f"{p} {label}": ExecConfig(precision=p, **changes) for label, changes in PATHS.items()
            for p in ("fp32", "int8")}
    acc = accuracy(ev, cfgs)
    images = torch.cat(data.batches)
    b32 = timing(dm, cfgs, images[:32], args.reps)
    b1 = timing(dm, cfgs, images[:1], 3 * args.reps)
    paths = []
    for label in PATHS:
        f, q = f"fp32 {label}", f"int8 {label}"
        paths.append({"path": label, "fp32": acc[f], "int8": acc[q],
                      "batch32_img_per_s": {"fp32": round(32 / b32[f], 1), "int8": round(32 / b32[q], 1)},
                      "batch32_speedup": round(b32[f] / b32[q], 2),
                      "batch1_ms": {"fp32": round(1e3 * b1[f], 2), "int8": round(1e3 * b1[q], 2)},
                      "batch1_speedup": round(b1[f] / b1[q], 2),
                      "int8_vs_fp32_default_batch32": round(b32["fp32 default"] / b32[q], 2)})
    result = {
        "machine": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "date": str(dt.date.today()), "reps": args.reps, "reduce_range": quant.REDUCE_RANGE,
        "calibration_images": excluded, "scored_images": data.n,
        "kernels_gops_batch32": kernels(args.reps),
        "paths": paths,
        "int8_memory_bytes": quant.pack_bytes(dm.module),
        "fp32_linear_weight_bytes": 4 * sum(lin.weight.numel() for lin in quant.linears(dm.module)),
        "seconds": round(time.perf_counter() - t0),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "int8_deit-cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
