"""Calibration: rank channels, heads and blocks by importance on a few real images, once.

Then reorder the weights so that "keep k" means "keep the first k": every width knob
becomes a view of the shared parameters. A permutation of an MLP's hidden channels (fc1
rows, its depthwise conv channels if any, fc2 columns) or of a block's heads (q/k/v rows,
output-projection columns, per-head position bias) leaves the full model's function
unchanged, so the default path's output is the same after reordering.

Criteria (both label-free; ``criterion="auto"`` measures both and keeps the better):
- ``magnitude``: activation-weighted magnitude. MLP channel j: E|h_j| * ||W_fc2[:, j]||;
  head h: E||o_h W_o[:, h]^T|| (the head's contribution to the block output).
- ``taylor``: first-order Taylor estimate of the loss change when a unit is removed,
  |E[sum a * dL/da]| over the unit's activations a, with L the cross-entropy against the
  full model's own predictions (pseudo-labels), so no labels are needed.
"Better" = lower mean KL(full || reduced) on held-out calibration images, averaged over
reduced paths at 25/50/75 % MLP width and half the heads.
Blocks are ranked (not reordered) by KL(full || block skipped), for attention and MLP
sub-layers separately: the sweep's greedy strategy skips where the model is resilient.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dynavit.config import ExecConfig
from dynavit.data.datasets import file_sha1, list_images, read_image
from dynavit.errors import DynavitError
from dynavit.knobs.width import recording
from dynavit.models.base import Perms

CRITERIA = ("magnitude", "taylor")


@dataclass
class Calibration:
    """Permutations (relative to the original weights) and rankings; saved beside the model."""

    criterion: str
    perms: dict[str, list[torch.Tensor]]  # "mlp", "heads" per block; "branch", "fuse" for a decoder
    block_kl: dict[str, list[float]] = field(default_factory=dict)  # "block" | "attn" | "mlp" -> per block
    comparison: dict[str, float] = field(default_factory=dict)  # criterion -> held-out mean KL
    n_images: int = 0
    source: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    image_hashes: list[str] = field(default_factory=list)  # SHA-1 of the image files, when known
    pixel_hashes: list[str] = field(default_factory=list)  # of each preprocessed image (``pixel_hash``)

    def identity(self) -> str:
        """Short hash of what calibration changes (the permutations) and how it ranked blocks."""
        h = hashlib.sha1(self.criterion.encode())
        for group in sorted(self.perms):
            for t in self.perms[group]:
                h.update(group.encode() + t.to(torch.int64).numpy().tobytes())
        h.update(json.dumps(self.block_kl, sort_keys=True).encode())
        return f"{self.criterion}:{h.hexdigest()[:16]}"

    def block_order(self, kind: str = "block") -> list[int]:
        """Blocks from least to most important (the order in which to skip them)."""
        kl = self.block_kl[kind]
        return sorted(range(len(kl)), key=lambda i: kl[i])

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{group}.{i}": p for group, ps in self.perms.items() for i, p in enumerate(ps)}
        tmp = folder / "calibration.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(folder / "calibration.safetensors")
        meta = {k: v for k, v in asdict(self).items() if k != "perms"}
        (folder / "calibration.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Calibration:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "calibration.json").read_text())
            tensors = load_file(str(folder / "calibration.safetensors"))
        except (OSError, ValueError) as e:
            raise DynavitError(f"cannot read calibration in {folder}: {e}") from None
        perms: dict[str, list[torch.Tensor]] = {}
        for key in sorted(tensors, key=lambda k: (k.split(".")[0], int(k.split(".")[1]))):
            perms.setdefault(key.split(".")[0], []).append(tensors[key])
        return cls(perms=perms, **meta)


def fingerprint(module: nn.Module, *, stored_as: torch.dtype | None = None) -> str:
    """Hash of the model's parameters, insensitive to the channel/head order calibration changes.

    Sums run in float64 on one thread: a float32 sum's rounding depends on how many threads
    split it, and a calibration made at 2 threads must load in a process running 1.
    ``stored_as``: the hash of the weights once rounded to that dtype (as a checkpoint stores them).
    """
    return "v2:" + _param_hash(module, torch.float64, threads=1, stored_as=stored_as)


def _param_hash(module: nn.Module, dtype: torch.dtype, threads: int, stored_as: torch.dtype | None = None) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = hashlib.sha1()
        for name, p in sorted(module.named_parameters()):
            t = p.detach() if stored_as is None else p.detach().to(stored_as)
            t = t.to(dtype)
            h.update(name.encode())
            h.update(f"{tuple(t.shape)} {t.sum().item():.6e} {t.abs().sum().item():.6e}".encode())
        return h.hexdigest()
    finally:
        torch.set_num_threads(before)


def _same_weights(module: nn.Module, saved: str) -> bool:
    """``saved`` is a ``fingerprint``, or an older float32 one made at whatever thread count its process ran."""
    if saved.startswith("v2:"):
        return saved == fingerprint(module)
    counts = dict.fromkeys([torch.get_num_threads(), *range(1, (os.cpu_count() or 1) + 1)])
    return any(saved == _param_hash(module, torch.float32, n) for n in counts)


class _Stats:
    """Importance accumulators fed by the width recorder (``knobs.width.observe``).

    Groups: per block, MLP hidden channels (input of fc2) and heads (per-head attention output,
    (B, h, N, d), before the output projection); for a decoder (SegFormer), each branch's
    ``linear_c`` output channels and the fused channels entering the classifier.
    """

    def __init__(self, model: nn.Module, taylor: bool) -> None:
        blocks = model.blocks
        self.blocks, self.taylor = blocks, taylor
        self.route: dict[int, tuple[str, int]] = {}
        for i, b in enumerate(blocks):
            self.route[id(b.mlp.fc2)] = ("mlp", i)
            self.route[id(b.attn.o)] = ("heads", i)
        self.scores: dict[str, list[torch.Tensor]] = {
            "mlp": [torch.zeros(b.mlp.fc2.in_features) for b in blocks],
            "heads": [torch.zeros(b.attn.num_heads) for b in blocks],
        }
        self.decoder = model.decoder
        if self.decoder is not None:
            for i, lin in enumerate(self.decoder.linear_c):
                self.route[id(lin)] = ("branch", i)
            self.route[id(self.decoder.classifier)] = ("fuse", 0)
            self.scores["branch"] = [torch.zeros(lin.out_features) for lin in self.decoder.linear_c]
            self.scores["fuse"] = [torch.zeros(self.decoder.width)]
        self.saved: list[tuple[str, int, torch.Tensor]] = []

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> None:
        hit = self.route.get(id(layer))
        if hit is None or (hit[0] == "heads" and x.dim() != 4):
            return
        kind, i = hit
        if self.taylor:
            x.retain_grad()
            self.saved.append((kind, i, x))
            return
        a = x.detach()
        if kind == "heads":
            b, nh, n, d = a.shape
            w = self.blocks[i].attn.o.weight.detach()[:, : nh * d].reshape(-1, nh, d)  # (C, h, d)
            contrib = torch.einsum("bhnd,chd->bhnc", a, w)
            self.scores["heads"][i] += contrib.norm(dim=-1).mean(dim=(0, 2)).cpu()
            return
        self.scores[kind][i] += _channel_mean_abs(a, kind).cpu() * self._out_weight_norm(kind, i).cpu()

    def _out_weight_norm(self, kind: str, i: int) -> torch.Tensor:
        """Norm of the weights each channel feeds: how much a unit of it moves the next layer."""
        if kind == "mlp":
            return self.blocks[i].mlp.fc2.weight.detach().norm(dim=0)
        dec = self.decoder
        if kind == "branch":
            return dec.fuse.weight.detach()[:, dec.branch_columns(i)].reshape(dec.width, -1).norm(dim=0)
        return dec.classifier.weight.detach().reshape(dec.classifier.out_channels, -1).norm(dim=0)

    def collect_taylor(self) -> None:
        for kind, i, x in self.saved:
            if x.grad is None:
                continue
            s = (x * x.grad).detach()
            if kind == "heads":
                self.scores["heads"][i] += s.sum(dim=(0, 2, 3)).abs().cpu()
            else:
                self.scores[kind][i] += _channel_sum(s, kind).abs().cpu()
        self.saved.clear()


def _channel_mean_abs(a: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean |activation| per channel: last dim for tokens (B, N, C), dim 1 for maps (B, C, H, W)."""
    if kind == "mlp":
        return a.abs().reshape(-1, a.shape[-1]).mean(0)
    return a.abs().transpose(0, 1).reshape(a.shape[1], -1).mean(1)


def _channel_sum(a: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mlp":
        return a.reshape(-1, a.shape[-1]).sum(0)
    return a.transpose(0, 1).reshape(a.shape[1], -1).sum(1)


def _pseudo_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own argmax (per pixel for segmentation)."""
    return F.cross_entropy(logits, logits.detach().argmax(1))


def _scores(dm: Any, batches: Sequence[torch.Tensor], criterion: str, bar: Any = None
            ) -> dict[str, list[torch.Tensor]]:
    stats = _Stats(dm.module, taylor=criterion == "taylor")
    for x in _counted(batches, bar):
        if criterion == "taylor":
            with torch.enable_grad(), recording(stats):
                _pseudo_loss(dm(x)).backward()
            stats.collect_taylor()
        else:
            with torch.no_grad(), recording(stats):
                dm(x)
    dm.module.zero_grad(set_to_none=True)
    return stats.scores


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean KL(ref || out) over images (and pixels for segmentation)."""
    return float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="none").sum(1).mean())


def _outputs(dm: Any, batches: Sequence[torch.Tensor], cfg: ExecConfig, bar: Any = None) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        return torch.cat([dm(x) for x in _counted(batches, bar)])


def _counted(batches: Sequence[torch.Tensor], bar: Any) -> Iterator[torch.Tensor]:
    """The batches, each counted on the progress bar once its forward pass is done."""
    for x in batches:
        yield x
        if bar is not None:
            bar.update(len(x))


def _passes(n_fit: int, n_held: int, n_all: int, candidates: int, probes: int, blocks: int) -> int:
    """Images run through the model by a calibration: the progress bar's total."""
    compare = n_held * (1 + candidates * probes) if candidates > 1 else 0
    return candidates * n_fit + compare + n_all * (1 + 3 * blocks)


def _probe_configs(dm: Any) -> list[ExecConfig]:
    half_heads = tuple(max(1, h // 2) for h in dm.space.heads)
    probes = [ExecConfig(mlp_width=w) for w in (0.25, 0.5, 0.75)] + [ExecConfig(heads=half_heads)]
    if dm.space.decoder_width:
        probes += [ExecConfig(decoder_width=w) for w in (0.25, 0.5)]
    return probes


def _compose(old: Perms, new: Perms) -> Perms:
    return {k: [o[p] for o, p in zip(old[k], new[k], strict=True)] for k in new}


def _inverse(perms: Perms) -> Perms:
    return {k: [p.argsort() for p in group] for k, group in perms.items()}


def pixel_hash(pixels: torch.Tensor) -> str:
    """Hash of one preprocessed image (C, H, W): the same file through the same transform hashes alike,
    so a sweep can tell its images from the calibration's even when no file hashes were recorded."""
    return hashlib.sha1(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def _to_batches(dm: Any, images: Any, batch_size: int) -> list[torch.Tensor]:
    """Calibration images: a tensor (N, 3, H, W), PIL images, or a folder of image files."""
    if isinstance(images, torch.Tensor):
        return list(images.split(batch_size))
    if isinstance(images, (str, Path)):
        paths = list_images(Path(images), recursive=True)
        if not paths:
            raise DynavitError(f"no images found under {images} to calibrate on")
        images = [read_image(p) for p in paths]
    tf = dm.transform
    tensors = [tf(img) for img in images]
    if not tensors:
        raise DynavitError("calibration needs at least one image")
    return list(torch.stack(tensors).split(batch_size))


def calibrate(dm: Any, images: Any, *, criterion: str = "auto", batch_size: int = 16,
              heldout_fraction: float = 0.25, progress: bool = False) -> Calibration:
    """Rank, choose the criterion, reorder ``dm``'s weights in place; returns the Calibration.

    ``progress``: a bar over the images run through the model (minutes for a large model on a CPU).
    """
    if criterion not in ("auto", *CRITERIA):
        raise DynavitError(f"unknown criterion {criterion!r} (choose auto, {', '.join(CRITERIA)})")
    t0 = time.perf_counter()
    previous = dm.exec_config
    dev = next(dm.module.parameters()).device
    cpu = _to_batches(dm, images, batch_size)
    pixels = [pixel_hash(t) for b in cpu for t in b]
    files = [file_sha1(p) for p in list_images(Path(images), recursive=True)] if isinstance(images, (str, Path)) else []
    batches = [b.to(dev) for b in cpu]
    n_images = sum(len(b) for b in batches)
    flat = torch.cat(batches)
    n_held = max(1, int(round(heldout_fraction * n_images))) if n_images > 1 else 0
    fit = list(flat[: n_images - n_held].split(batch_size)) if n_held else batches
    held = list(flat[n_images - n_held:].split(batch_size)) if n_held else batches
    fp = dm.calibration.fingerprint if dm.calibration is not None else fingerprint(dm.base_module)
    dm.configure(ExecConfig())
    candidates = CRITERIA if criterion == "auto" else (criterion,)
    probes = _probe_configs(dm)
    n = dm.space.num_blocks
    total = _passes(n_images - n_held if n_held else n_images, n_held or n_images, n_images, len(candidates),
                    len(probes), n)
    bar = tqdm(total=total, desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        perms = {c: {k: [v.argsort(descending=True, stable=True) for v in group]
                     for k, group in _scores(dm, fit, c, bar).items()} for c in candidates}
        comparison: dict[str, float] = {}
        if len(candidates) > 1:
            ref = _outputs(dm, held, ExecConfig(), bar)
            for c in candidates:
                dm.module.permute(perms[c])
                comparison[c] = sum(_kl(ref, _outputs(dm, held, p, bar)) for p in probes) / len(probes)
                dm.module.permute(_inverse(perms[c]))
        best = min(comparison, key=comparison.get) if comparison else candidates[0]
        dm.module.permute(perms[best])
        ref = _outputs(dm, batches, ExecConfig(), bar)
        block_kl = {
            kind: [_kl(ref, _outputs(dm, batches, ExecConfig(**{key: (i,)}), bar)) for i in range(n)]
            for kind, key in (("block", "skip_blocks"), ("attn", "skip_attn"), ("mlp", "skip_mlp"))
        }
    finally:
        bar.close()
        dm.configure(previous)
    old = dm.calibration
    chosen = perms[best] if old is None else _compose(old.perms, perms[best])  # relative to the original weights
    return Calibration(criterion=best, perms={k: [p.cpu() for p in v] for k, v in chosen.items()},
                       block_kl=block_kl, comparison=comparison, n_images=n_images, source=dm.source,
                       fingerprint=fp, seconds=time.perf_counter() - t0, image_hashes=files, pixel_hashes=pixels)


def apply_saved(dm: Any, calib: Calibration) -> None:
    """Apply a saved calibration to a freshly loaded (uncalibrated) model of the same weights."""
    if dm.calibration is not None:
        raise DynavitError("this model is already calibrated; load the calibration into a freshly loaded model")
    if calib.fingerprint and not _same_weights(dm.base_module, calib.fingerprint):
        raise DynavitError(f"calibration was made for other weights ({calib.source}); this model is {dm.source}")
    blocks = dm.base_module.blocks
    if len(calib.perms["mlp"]) != len(blocks):
        raise DynavitError(f"calibration has {len(calib.perms['mlp'])} blocks, this model {len(blocks)}")
    dm.base_module.permute(calib.perms)
