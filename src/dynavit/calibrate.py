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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.knobs.width import recording

CRITERIA = ("magnitude", "taylor")


@dataclass
class Calibration:
    """Permutations (relative to the original weights) and rankings; saved beside the model."""

    criterion: str
    mlp_perms: list[torch.Tensor]
    head_perms: list[torch.Tensor]
    block_kl: dict[str, list[float]] = field(default_factory=dict)  # "block" | "attn" | "mlp" -> per block
    comparison: dict[str, float] = field(default_factory=dict)  # criterion -> held-out mean KL
    n_images: int = 0
    source: str = ""
    fingerprint: str = ""
    seconds: float = 0.0

    def block_order(self, kind: str = "block") -> list[int]:
        """Blocks from least to most important (the order in which to skip them)."""
        kl = self.block_kl[kind]
        return sorted(range(len(kl)), key=lambda i: kl[i])

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"blocks.{i}.mlp_perm": p for i, p in enumerate(self.mlp_perms)}
        tensors |= {f"blocks.{i}.head_perm": p for i, p in enumerate(self.head_perms)}
        tmp = folder / "calibration.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(folder / "calibration.safetensors")
        meta = {k: v for k, v in asdict(self).items() if k not in ("mlp_perms", "head_perms")}
        (folder / "calibration.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Calibration:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / "calibration.json").read_text())
            tensors = load_file(str(folder / "calibration.safetensors"))
        except (OSError, ValueError) as e:
            raise DynavitError(f"cannot read calibration in {folder}: {e}") from None
        n = len([k for k in tensors if k.endswith(".mlp_perm")])
        return cls(mlp_perms=[tensors[f"blocks.{i}.mlp_perm"] for i in range(n)],
                   head_perms=[tensors[f"blocks.{i}.head_perm"] for i in range(n)], **meta)


def fingerprint(module: nn.Module) -> str:
    """Hash of the model's parameters, insensitive to the channel/head order calibration changes."""
    h = hashlib.sha1()
    for name, p in sorted(module.named_parameters()):
        t = p.detach().float()
        h.update(name.encode())
        h.update(f"{tuple(t.shape)} {t.sum().item():.6e} {t.abs().sum().item():.6e}".encode())
    return h.hexdigest()


def _blocks(family_model: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(family_model, "blocks", None)
    if blocks is None:
        raise DynavitError(f"{type(family_model).__name__} exposes no blocks to calibrate")
    return blocks


class _Stats:
    """Per-block importance accumulators fed by the width recorder."""

    def __init__(self, blocks: Sequence[nn.Module], taylor: bool) -> None:
        self.fc2 = {id(b.mlp.fc2): i for i, b in enumerate(blocks)}
        self.proj = {id(b.attn.o): i for i, b in enumerate(blocks)}
        self.blocks = blocks
        self.taylor = taylor
        n = len(blocks)
        self.mlp = [torch.zeros(b.mlp.fc2.in_features) for b in blocks]
        self.heads = [torch.zeros(b.attn.num_heads) for b in blocks]
        self.saved: list[tuple[str, int, torch.Tensor]] = []
        self.n = [0] * n

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> None:
        key = id(layer)
        if key in self.fc2:
            i = self.fc2[key]
            if self.taylor:
                x.retain_grad()
                self.saved.append(("mlp", i, x))
            else:
                w = self.blocks[i].mlp.fc2.weight.detach().norm(dim=0)
                h = x.detach().abs()
                self.mlp[i] += h.reshape(-1, h.shape[-1]).mean(0).cpu() * w.cpu()
        elif key in self.proj and x.dim() == 4:
            i = self.proj[key]
            if self.taylor:
                x.retain_grad()
                self.saved.append(("heads", i, x))
            else:
                b, nh, n, d = x.shape
                w = self.blocks[i].attn.o.weight.detach()[:, : nh * d].reshape(-1, nh, d)  # (C, h, d)
                contrib = torch.einsum("bhnd,chd->bhnc", x.detach(), w)
                self.heads[i] += contrib.norm(dim=-1).mean(dim=(0, 2)).cpu()

    def collect_taylor(self) -> None:
        for kind, i, x in self.saved:
            if x.grad is None:
                continue
            s = (x * x.grad).detach()
            if kind == "mlp":
                self.mlp[i] += s.reshape(-1, s.shape[-1]).sum(0).abs().cpu()
            else:
                self.heads[i] += s.sum(dim=(0, 2, 3)).abs().cpu()
        self.saved.clear()


def _pseudo_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own argmax (per pixel for segmentation)."""
    return F.cross_entropy(logits, logits.detach().argmax(1))


def _scores(dm: Any, batches: Sequence[torch.Tensor], criterion: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    blocks = _blocks(dm.module)
    stats = _Stats(blocks, taylor=criterion == "taylor")
    for x in batches:
        if criterion == "taylor":
            with torch.enable_grad(), recording(stats):
                _pseudo_loss(dm(x)).backward()
            stats.collect_taylor()
        else:
            with torch.no_grad(), recording(stats):
                dm(x)
    dm.module.zero_grad(set_to_none=True)
    return stats.mlp, stats.heads


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean KL(ref || out) over images (and pixels for segmentation)."""
    return float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="none").sum(1).mean())


def _outputs(dm: Any, batches: Sequence[torch.Tensor], cfg: ExecConfig) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        return torch.cat([dm(x) for x in batches])


def _probe_configs(dm: Any) -> list[ExecConfig]:
    half_heads = tuple(max(1, h // 2) for h in dm.space.heads)
    return [ExecConfig(mlp_width=w) for w in (0.25, 0.5, 0.75)] + [ExecConfig(heads=half_heads)]


def _permute_rows(t: torch.Tensor, idx: torch.Tensor) -> None:
    t.copy_(t[idx])


def apply_permutations(family_model: nn.Module, mlp_perms: Sequence[torch.Tensor],
                       head_perms: Sequence[torch.Tensor]) -> None:
    """Reorder weights in place (same storage): MLP hidden channels and heads, per block."""
    with torch.no_grad():
        for blk, mp, hp in zip(_blocks(family_model), mlp_perms, head_perms, strict=True):
            m, a = blk.mlp, blk.attn
            dev = m.fc1.weight.device
            mp, hp = mp.to(dev), hp.to(dev)
            _permute_rows(m.fc1.weight, mp)
            if m.fc1.bias is not None:
                _permute_rows(m.fc1.bias, mp)
            dw = getattr(m, "dwconv", None)
            if dw is not None:
                _permute_rows(dw.weight, mp)
                if dw.bias is not None:
                    _permute_rows(dw.bias, mp)
            m.fc2.weight.copy_(m.fc2.weight[:, mp])
            d = a.head_dim
            rows = (hp[:, None] * d + torch.arange(d, device=dev)[None, :]).reshape(-1)
            for lin in (a.q, a.k, a.v):
                _permute_rows(lin.weight, rows)
                if lin.bias is not None:
                    _permute_rows(lin.bias, rows)
            a.o.weight.copy_(a.o.weight[:, rows])
            table = getattr(a, "rel_bias_table", None)  # (positions, heads) relative position bias
            if table is not None:
                table.copy_(table[:, hp])


def _to_batches(dm: Any, images: Any, batch_size: int) -> list[torch.Tensor]:
    """Calibration images: a tensor (N, 3, H, W), PIL images, or a folder of image files."""
    if isinstance(images, torch.Tensor):
        return list(images.split(batch_size))
    if isinstance(images, (str, Path)):
        from dynavit.data.datasets import list_images, read_image

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
              heldout_fraction: float = 0.25) -> Calibration:
    """Rank, choose the criterion, reorder ``dm``'s weights in place; returns the Calibration."""
    if criterion not in ("auto", *CRITERIA):
        raise DynavitError(f"unknown criterion {criterion!r} (choose auto, {', '.join(CRITERIA)})")
    t0 = time.perf_counter()
    previous = dm.exec_config
    dev = next(dm.module.parameters()).device
    batches = [b.to(dev) for b in _to_batches(dm, images, batch_size)]
    n_images = sum(len(b) for b in batches)
    flat = torch.cat(batches)
    n_held = max(1, int(round(heldout_fraction * n_images))) if n_images > 1 else 0
    fit = list(flat[: n_images - n_held].split(batch_size)) if n_held else batches
    held = list(flat[n_images - n_held:].split(batch_size)) if n_held else batches
    fp = getattr(dm, "calibration", None)
    fp = fp.fingerprint if fp is not None else fingerprint(dm.module)
    dm.configure(ExecConfig())
    try:
        candidates = CRITERIA if criterion == "auto" else (criterion,)
        ranked = {c: _scores(dm, fit, c) for c in candidates}
        perms = {c: ([s.argsort(descending=True, stable=True) for s in mlp],
                     [s.argsort(descending=True, stable=True) for s in heads]) for c, (mlp, heads) in ranked.items()}
        comparison: dict[str, float] = {}
        if len(candidates) > 1:
            ref = _outputs(dm, held, ExecConfig())
            probes = _probe_configs(dm)
            for c in candidates:
                apply_permutations(dm.module, *perms[c])
                comparison[c] = sum(_kl(ref, _outputs(dm, held, p)) for p in probes) / len(probes)
                apply_permutations(dm.module, *_inverse(perms[c]))
        best = min(comparison, key=comparison.get) if comparison else candidates[0]
        apply_permutations(dm.module, *perms[best])
        ref = _outputs(dm, batches, ExecConfig())
        n = dm.space.num_blocks
        block_kl = {
            kind: [_kl(ref, _outputs(dm, batches, ExecConfig(**{key: (i,)}))) for i in range(n)]
            for kind, key in (("block", "skip_blocks"), ("attn", "skip_attn"), ("mlp", "skip_mlp"))
        }
    finally:
        dm.configure(previous)
    old = getattr(dm, "calibration", None)
    mlp_p, head_p = perms[best]
    if old is not None:  # compose with the earlier reordering: always relative to the original weights
        mlp_p = [o[p] for o, p in zip(old.mlp_perms, mlp_p, strict=True)]
        head_p = [o[p] for o, p in zip(old.head_perms, head_p, strict=True)]
    return Calibration(criterion=best, mlp_perms=[p.cpu() for p in mlp_p], head_perms=[p.cpu() for p in head_p],
                       block_kl=block_kl, comparison=comparison, n_images=n_images, source=dm.source,
                       fingerprint=fp, seconds=time.perf_counter() - t0)


def _inverse(perms: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return tuple([p.argsort() for p in group] for group in perms)  # type: ignore[return-value]


def apply_saved(dm: Any, calib: Calibration) -> None:
    """Apply a saved calibration to a freshly loaded (uncalibrated) model of the same weights."""
    if getattr(dm, "calibration", None) is not None:
        raise DynavitError("this model is already calibrated; load the calibration into a freshly loaded model")
    fp = fingerprint(dm.module)
    if calib.fingerprint and fp != calib.fingerprint:
        raise DynavitError(f"calibration was made for other weights ({calib.source}); this model is {dm.source}")
    blocks = _blocks(dm.module)
    if len(calib.mlp_perms) != len(blocks):
        raise DynavitError(f"calibration has {len(calib.mlp_perms)} blocks, this model {len(blocks)}")
    apply_permutations(dm.module, calib.mlp_perms, calib.head_perms)
