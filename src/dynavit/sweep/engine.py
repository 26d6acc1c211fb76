"""Measure one config: quality on a cached dataset, exact MACs, latency, throughput, energy.

Speed comes from doing shared work once per sweep, not once per config:
- ``CachedData`` decodes and preprocesses every image once; every config reads the same
  tensors (the resolution knob resizes inside the model, so one cache serves all).
- Prefix reuse: configs that execute the same first k blocks (same resolution, same block
  plans, same token settings so far) produce the same activations after block k. When the
  next config is known, the evaluator keeps those activations and the next config runs only
  blocks k.. onwards. Every family that runs in block steps (``FamilyModel.steps``: ViT, Swin, SegFormer) takes part.
  The result is bit-identical to a full forward: the same ops run on the same tensors.

A multiplexed path (``ExecConfig(mux=N)``) is measured per pass of N images: its MACs are one
pass's divided by N (energy too), and its latency is one pass, which is what each of its N images
waits.
"""

from __future__ import annotations

import hashlib
import platform
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from dynavit.calibrate import pixel_hash
from dynavit.config import ExecConfig, resolve
from dynavit.cost.energy import EnergyMeter
from dynavit.cost.flops import macs_per_image
from dynavit.errors import DynavitError
from dynavit.models.prefix import PrefixRunner, share_depth
from dynavit.pipeline import Scorer, batches, check_compatible, dataset_name, placement
from dynavit.sweep import stats
from dynavit.sweep.store import Row
from dynavit.version import __version__

# images a path whose token counts depend on the image (the adaptive threshold) is costed over:
# 8 misread DeiT-tiny's per-image merges by up to 1.5 points of saving against all 400 images
MAC_IMAGES = 32


@dataclass
class CachedData:
    """A dataset decoded and preprocessed once: batches of pixels and their targets."""

    batches: list[torch.Tensor]
    targets: list[Any]  # per batch: LongTensor (classification) or list of (H, W) label arrays
    task: str
    num_classes: int
    ignore_index: int
    skipped: list[str]
    describe: dict[str, Any]

    @property
    def n(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.batches)

    def frames(self) -> list[tuple[torch.Tensor, Any]]:
        """(pixels (1, 3, H, W), target) per image, in order: the frames of a trace."""
        return [(px[j:j + 1], t[j] if isinstance(t, list) else int(t[j]))
                for px, t in zip(self.batches, self.targets, strict=True) for j in range(len(px))]

    def subset(self, idx: Any) -> CachedData:
        """The images at ``idx`` (in that order), batched as before: one part of a split."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        px = torch.cat(self.batches)[idx]
        if self.task == "classification":
            flat: Any = torch.cat(self.targets)[idx]
        else:
            every = [t for ts in self.targets for t in ts]
            flat = [every[i] for i in idx.tolist()]
        bs = len(self.batches[0])
        return CachedData(list(px.split(bs)), [flat[i:i + bs] for i in range(0, len(flat), bs)], self.task,
                          self.num_classes, self.ignore_index, [], self.describe)

    def spread(self, k: int) -> list[torch.Tensor]:
        """k single images (1, 3, H, W) spread evenly over the data: the batch-1 inputs that MACs are
        averaged over, here and wherever a path's cost is read off real images (the accelerator's)."""
        flat = [img for b in self.batches for img in b.split(1)]
        return [flat[i * len(flat) // k] for i in range(min(k, len(flat)))]

    def pixel_hashes(self) -> list[str]:
        """``calibrate.pixel_hash`` of every image, in order: what identifies an image across tools."""
        return [pixel_hash(px[j]) for px in self.batches for j in range(len(px))]

    def fingerprint(self) -> str:
        """SHA-256 of exactly what is evaluated: the preprocessed pixels and the targets."""
        h = hashlib.sha256()
        for px, tg in zip(self.batches, self.targets, strict=True):
            h.update(px.contiguous().numpy().tobytes())
            for t in (tg if isinstance(tg, list) else [tg.numpy()]):
                h.update(np.ascontiguousarray(t).tobytes())
        return h.hexdigest()[:24]


def cache_dataset(model: Any, dataset: Any, *, batch_size: int = 32, skip_bad: bool = False,
                  progress: bool = True, workers: int = 2, max_gb: float = 6.0) -> CachedData:
    """Decode + transform every image once (threads), batched while the shapes agree."""
    check_compatible(model, dataset)
    if len(dataset) == 0:
        raise DynavitError(f"{dataset_name(dataset)} has no images to sweep over")
    h, w = model.input_size
    need = len(dataset) * 3 * h * w * 4 / 2**30
    if need > max_gb:
        raise DynavitError(f"caching {len(dataset)} images at {h}x{w} needs about {need:.1f} GiB "
                           f"(limit {max_gb} GiB); sweep over fewer images with --limit")
    pixels: list[torch.Tensor] = []
    targets: list[Any] = []
    skipped: list[str] = []
    with tqdm(total=len(dataset), desc="decode", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches(dataset, model.transform, batch_size=batch_size, skip_bad=skip_bad,
                             skipped=skipped, bar=bar, workers=workers):
            pixels.append(batch.pixels)
            targets.append(batch.targets)
            bar.update(len(batch))
    if not pixels:
        raise DynavitError(f"no image of {dataset_name(dataset)} could be read")
    return CachedData(pixels, targets, dataset.task, dataset.num_classes,
                      getattr(dataset, "ignore_index", 255), skipped,
                      dataset.describe() if hasattr(dataset, "describe") else {})


def warn_calibration_overlap(dm: Any, data: CachedData) -> int:
    """Warn when images the model was calibrated on are among those it is measured on; returns how many.

    Calibration ranks units on its images, so they score a calibrated path too well. A sweep leaves
    them out by file hash when the calibration recorded those; this catches the rest (calibrations
    made from tensors or PIL images), by the preprocessed pixels.
    """
    calib = getattr(dm, "calibration", None)
    used = set(getattr(calib, "pixel_hashes", None) or ())
    n = sum(h in used for h in data.pixel_hashes()) if used else 0
    if n:
        warnings.warn(f"{n} of the {data.n} images measured here are calibration images: their quality is "
                      "biased upwards; measure on other images (a sweep leaves out images whose file hashes the "
                      "calibration recorded: calibrate on a folder, or set image_hashes)", stacklevel=3)
    return n


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), for benchmark and row labels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    n = torch.get_num_threads()
    return f"cpu:{cpu_name()} ({n} thread{'s' if n != 1 else ''})"


def versions() -> dict[str, str]:
    """Versions of what a measurement depends on, stored with every row."""
    return {"dynavit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


class Evaluator:
    """Measures configs of one ``DynamicModel`` on one ``CachedData``."""

    def __init__(self, dm: Any, data: CachedData, *, latency_repeats: int = 50, warmup: int = 2,
                 throughput_repeats: int = 3, measure_latency: bool = True, reuse_prefix: bool = True,
                 n_boot: int = 1000, seed: int = 0, mac_images: int = MAC_IMAGES) -> None:
        self.dm, self.data = dm, data
        self.latency_repeats, self.warmup = latency_repeats, warmup
        self.throughput_repeats = throughput_repeats
        self.measure_latency, self.reuse_prefix = measure_latency, reuse_prefix
        self.n_boot, self.seed, self.mac_images = n_boot, seed, mac_images
        self.device, self.dtype = placement(dm, dm.module)
        self.device_name = device_name(self.device)
        self.versions = versions()
        self.energy = EnergyMeter.for_device(self.device)
        self._prefix = PrefixRunner()
        self._singles: dict[int, list[torch.Tensor]] = {}
        warn_calibration_overlap(dm, data)

    # ---- quality -------------------------------------------------------------------------------
    @property
    def reused_blocks(self) -> int:
        """Block-batches not recomputed thanks to prefix reuse."""
        return self._prefix.reused_blocks

    def _share_depth(self, impl: Any, cfg: ExecConfig, nxt: ExecConfig | None) -> int:
        """How many leading blocks ``cfg`` and ``nxt`` execute identically (0: none)."""
        if nxt is None or not impl.steps or nxt.variant != cfg.variant:
            return 0
        try:
            other = resolve(nxt, impl.space)
        except DynavitError:
            return 0
        return share_depth(impl, impl.plan, other)

    def _forward_all(self, impl: Any, cfg: ExecConfig, nxt: ExecConfig | None,
                     ) -> tuple[list[torch.Tensor], list[float], bool]:
        staged = self.reuse_prefix and impl.steps
        if staged:
            run = self._prefix.outputs(impl, self.data.batches, self._share_depth(impl, cfg, nxt),
                                       lambda px: px.to(self.device, self.dtype))
        else:
            run = (impl(px.to(self.device, self.dtype)) for px in self.data.batches)
        outs, times = [], []
        while True:
            t0 = time.perf_counter()
            out = next(run, None)
            if out is None:
                break
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
            outs.append(out.float().cpu())
        return outs, times, staged and self._prefix.resumed

    def _score(self, outs: list[torch.Tensor]) -> tuple[dict[str, Any], np.ndarray]:
        d = self.data
        scorer = Scorer(d.task, self.dm.num_labels, d.num_classes, d.ignore_index)
        for logits, targets in zip(outs, d.targets, strict=True):
            scorer.update(logits, targets)
        return scorer.result(self.n_boot, self.seed), scorer.per_image()

    # ---- cost ----------------------------------------------------------------------------------
    def _images(self, k: int) -> list[torch.Tensor]:
        """k single images spread over the data (batch-1 inputs for MACs and latency), made once per k."""
        if k not in self._singles:
            self._singles[k] = [x.to(self.device, self.dtype) for x in self.data.spread(k)]
        return self._singles[k]

    def _passes(self, k: int, mux: int) -> list[torch.Tensor]:
        """Inputs of k single-request passes: one image each, or N images for a multiplexed path."""
        if mux == 1:
            return self._images(k)
        imgs = self._images(k * mux)
        return [torch.cat(imgs[i::k]) for i in range(k)]

    def _macs(self, impl: Any, cfg: ExecConfig) -> dict[str, float]:
        """Per-image MACs by class at batch 1, averaged over ``mac_images`` images when the path is adaptive."""
        imgs = self._passes(self.mac_images if cfg.token_threshold is not None else 1, cfg.mux)
        by_class: dict[str, float] = {}
        for x in imgs:
            for cls, macs in macs_per_image(impl, x).items():
                by_class[cls] = by_class.get(cls, 0.0) + macs / len(imgs)
        return by_class

    def _latency(self, impl: Any, mux: int = 1) -> tuple[list[float], float | None]:
        imgs = self._passes(min(8, self.latency_repeats), mux)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for i in range(self.warmup):
            impl(imgs[i % len(imgs)])
        times = []
        if self.energy:
            self.energy.start()
        for i in range(self.latency_repeats):
            sync()
            t0 = time.perf_counter()
            impl(imgs[i % len(imgs)])
            sync()
            times.append(time.perf_counter() - t0)
        energy = self.energy.stop() / self.latency_repeats / mux if self.energy else None  # per image
        return times, energy

    def _throughput(self, impl: Any) -> list[float]:
        px = self.data.batches[0].to(self.device, self.dtype)
        impl(px)
        times = []
        for _ in range(self.throughput_repeats):
            t0 = time.perf_counter()
            impl(px)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return times

    def _round_latency(self, cfgs: list[ExecConfig]) -> tuple[list[list[float]], dict[str, float]]:
        """Batch-1 times (s) of every config, taken round-robin: each repeat times all of them once, in a
        fresh shuffled order, so a drift in the machine's speed touches all alike instead of whichever
        configs were timed while it lasted. The default path is timed before and after the round too;
        the ratio of the two says how far the machine moved while the round was timed."""
        rng = np.random.default_rng(self.seed + len(cfgs))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        inputs = [self._passes(min(8, self.latency_repeats), c.mux) for c in cfgs]

        def once(cfg: ExecConfig, x: torch.Tensor) -> float:
            impl = self.dm.configure(cfg).module
            sync()
            t0 = time.perf_counter()
            impl(x)
            sync()
            return time.perf_counter() - t0

        ref, k = ExecConfig(), max(3, self.latency_repeats // 4)
        with torch.inference_mode():
            for c, xs in zip(cfgs, inputs, strict=True):
                for i in range(self.warmup):
                    once(c, xs[i % len(xs)])
            before = [once(ref, self._images(1)[0]) for _ in range(k)]
            times: list[list[float]] = [[] for _ in cfgs]
            for r in range(self.latency_repeats):
                for i in rng.permutation(len(cfgs)):
                    times[i].append(once(cfgs[i], inputs[i][r % len(inputs[i])]))
            after = [once(ref, self._images(1)[0]) for _ in range(k)]
        return times, {"default_drift": float(np.median(after) / np.median(before)), "round": len(cfgs)}

    def measure_round(self, cfgs: list[ExecConfig], labels: list[str] | None = None, strategy: str = "",
                      group: int = 4, then: ExecConfig | None = None) -> Iterator[Row]:
        """``measure`` for many configs, in order (each told the next, for prefix reuse; the last told
        ``then``), their latencies timed together (``_round_latency``) in groups of ``group``; rows come
        group by group.

        Each row's ``metrics["latency"]`` keeps how far its first and last timings were apart
        (``spread``, a ratio of medians) and the default path's end/start ratio in its round
        (``default_drift``): ``pareto.latency_warnings`` reads them.
        """
        labels = labels or [""] * len(cfgs)
        for g in range(0, len(cfgs), group):
            part = cfgs[g:g + group]
            rows = [self.measure(c, next_config=cfgs[g + j + 1] if g + j + 1 < len(cfgs) else then,
                                 label=labels[g + j], strategy=strategy, latency=False)
                    for j, c in enumerate(part)]
            if self.measure_latency:
                times, drift = self._round_latency(part)
                for row, t in zip(rows, times, strict=True):
                    half = len(t) // 2
                    a, b = float(np.median(t[:half] or t)), float(np.median(t[half:]))
                    row.latency_p50_ms, row.latency_p95_ms = _pct(t, 50), _pct(t, 95)
                    row.metrics["latency"] = {"runs": len(t), "spread": max(a, b) / min(a, b), **drift}
            yield from rows

    # ---- one config ----------------------------------------------------------------------------
    def measure(self, cfg: ExecConfig, *, next_config: ExecConfig | None = None, label: str = "",
                strategy: str = "", latency: bool = True) -> Row:
        """Quality, MACs, throughput and (with ``latency``, one config at a time) latency and energy.

        ``latency=False`` leaves batch-1 latency to the caller (``measure_round`` times a round together);
        energy is still measured here, since it needs a config's runs back to back.
        """
        t_start = time.perf_counter()
        impl = self.dm.configure(cfg).module
        impl.eval()
        with torch.inference_mode():
            outs, times, reused = self._forward_all(impl, cfg, next_config)
            metrics, per_image = self._score(outs)
            bs = len(self.data.batches[0])
            full = [t for t, b in zip(times, self.data.batches, strict=True) if len(b) == bs]
            if self.measure_latency:
                lat, energy = self._latency(impl, cfg.mux) if latency or self.energy else ([], None)
                lat = lat if latency else []
                if reused or len(full) < 3:
                    full = self._throughput(impl)
            else:
                lat, energy, full = [], None, []
        macs = self._macs(impl, cfg)
        main = stats.main_metric(self.data.task)
        m = metrics[main]
        lo, hi = (m["ci_low"], m["ci_high"]) if main != "top1" else \
            stats.interval(per_image, self.data.task)  # a proportion: exact, where a bootstrap of 5/5 says [1, 1]
        return Row(
            config=cfg, quality=m["value"], quality_lo=lo, quality_hi=hi, metrics=metrics,
            macs=sum(macs.values()), macs_by_class=macs,
            latency_p50_ms=_pct(lat, 50) if lat else None, latency_p95_ms=_pct(lat, 95) if lat else None,
            batch=bs, batch_p50_ms=_pct(full, 50) if full else None, batch_p95_ms=_pct(full, 95) if full else None,
            images_per_s=bs / float(np.median(full)) if full else None, per_image=per_image,
            device=self.device_name, versions=self.versions, energy_mj=energy, label=label, strategy=strategy,
            seconds=time.perf_counter() - t_start,
        )
