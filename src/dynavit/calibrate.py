"""Calibration: rank channels, heads and blocks by importance on a few real images, once.

Then reorder the weights so that "keep k" means "keep the first k": every width knob
becomes a view of the shared parameters. A permutation of an MLP's hidden channels (fc1
rows, its depthwise conv channels if any, fc2 columns) or of a block's heads (q/k/v rows,
output-projection columns, per-head position bias) leaves the full model's function
unchanged, so the default path's output is the same after reordering.

Criteria (``dynavit.importance``: magnitude, variance, taylor; ``criterion="auto"`` measures
each and keeps the best).
"Better" = lower mean KL(full || reduced) on held-out calibration images, averaged over
reduced paths at 25/50/75 % MLP width and half the heads, each path run as it will be served
(with the compensation, when one is made).
Compensation (``compensate=True``, ``dynavit.compensation``): the full model's statistics that
restore what removed units and skipped sub-layers contributed, the method chosen the same way.
Blocks are ranked (not reordered) by KL(full || block skipped), for whole blocks and attention and
MLP sub-layers separately. What is served is a set of skipped blocks, not one, and two blocks each
harmless alone can be ruinous together: the first half of each order is therefore composed
greedily (``skip_orders``): the next block is the one whose skip, added to those before it, raises
the KL least. "Skip k" knobs and deadlines take the first k of that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dynavit.compensation import FOCUS, RIDGES, Compensation, choose, measure
from dynavit.config import ExecConfig
from dynavit.data.datasets import file_sha1, list_images, read_image
from dynavit.errors import DynavitError
from dynavit.importance import CRITERIA, counted, scores
from dynavit.knobs import compensate as compensate_
from dynavit.models.base import Perms
from dynavit.models.prefix import PrefixRunner, share_depth


@dataclass
class Calibration:
    """Permutations (relative to the original weights) and rankings; saved beside the model."""

    criterion: str
    perms: dict[str, list[torch.Tensor]]  # "mlp", "heads" per block; "branch", "fuse" for a decoder
    block_kl: dict[str, list[float]] = field(default_factory=dict)  # "block" | "attn" | "mlp" -> per block
    skip_orders: dict[str, list[int]] = field(default_factory=dict)  # kind -> first blocks to skip, composed
    comparison: dict[str, float] = field(default_factory=dict)  # criterion -> held-out mean KL
    n_images: int = 0
    source: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    image_hashes: list[str] = field(default_factory=list)  # SHA-1 of the image files, when known
    pixel_hashes: list[str] = field(default_factory=list)  # of each preprocessed image (``pixel_hash``)
    compensation: Compensation | None = None

    def identity(self) -> str:
        """Short hash of what calibration changes (the permutations) and how it ranked blocks."""
        h = hashlib.sha1(self.criterion.encode())
        for group in sorted(self.perms):
            for t in self.perms[group]:
                h.update(group.encode() + t.to(torch.int64).numpy().tobytes())
        h.update(json.dumps(self.block_kl, sort_keys=True).encode())
        if self.skip_orders:  # absent in calibrations made before composed orders: their identity stays
            h.update(json.dumps(self.skip_orders, sort_keys=True).encode())
        if self.compensation is not None:
            h.update(self.compensation.identity().encode())
        return f"{self.criterion}:{h.hexdigest()[:16]}"

    def block_order(self, kind: str = "block") -> list[int]:
        """Blocks in the order in which to skip them: the composed order first, then by single-skip KL."""
        kl = self.block_kl[kind]
        first = self.skip_orders.get(kind, [])
        return first + [i for i in sorted(range(len(kl)), key=lambda i: kl[i]) if i not in first]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{group}.{i}": p for group, ps in self.perms.items() for i, p in enumerate(ps)}
        tmp = folder / "calibration.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(folder / "calibration.safetensors")
        meta = {k: v for k, v in asdict(self).items() if k not in ("perms", "compensation")}
        if self.compensation is not None:
            self.compensation.save(folder)
            meta["compensation"] = self.compensation.meta()
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
        comp = meta.pop("compensation", None)
        return cls(perms=perms, compensation=None if comp is None else Compensation.load(folder, comp), **meta)


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


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean KL(ref || out) over images (and pixels for segmentation)."""
    return float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="none").sum(1).mean())


def _outputs(dm: Any, batches: Sequence[torch.Tensor], cfg: ExecConfig, bar: Any = None) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        return torch.cat([dm(x) for x in counted(batches, bar)])


def _passes(n_fit: int, n_held: int, n_all: int, candidates: int, probes: int, blocks: int, compensate: bool,
            branches: int = 0, focus: int = 0) -> int:
    """Images run through the model by a calibration: the progress bar's total (``focus``: focus probe runs)."""
    compare = n_held * candidates * probes + (candidates * n_fit if compensate else 0) if candidates > 1 else 0
    fit_comp = n_fit + n_held * ((3 + len(RIDGES)) * probes + 6 + 2 * branches + focus) if compensate else 0
    composed = min(GREEDY_IMAGES, n_all) * (1 + len(SKIP_KINDS) * sum(blocks - s for s in range(1, blocks // 2)))
    return candidates * n_fit + n_held + compare + fit_comp + n_all * (1 + 3 * blocks) + composed


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
    if isinstance(images, torch.Tensor):  # an inference-mode tensor cannot enter autograd (taylor): copied
        return list((images.clone() if images.is_inference() else images).split(batch_size))
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
              heldout_fraction: float = 0.25, compensate: bool = True, progress: bool = False) -> Calibration:
    """Rank, choose the criterion, reorder ``dm``'s weights in place; returns the Calibration.

    ``compensate``: also measure the corrections for removed units and skipped sub-layers, and
    keep the method the held-out images score best (``dynavit.compensation``).
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
    fit, held = _split(batches, heldout_fraction, batch_size)
    fp = dm.calibration.fingerprint if dm.calibration is not None else fingerprint(dm.base_module)
    dm.configure(ExecConfig())
    _uninstall(dm)
    candidates = CRITERIA if criterion == "auto" else (criterion,)
    probes, n = _probe_configs(dm), dm.space.num_blocks
    n_all, n_held, n_fit = (sum(len(b) for b in bs) for bs in (batches, held, fit))
    branch_probes = _branch_probes(dm)
    focus = len(FOCUS) * sum(p.mlp_width != 1.0 for p in probes) if dm.family == "vit" else 0
    total = _passes(n_fit, n_held, n_all, len(candidates), len(probes), n, compensate, len(branch_probes), focus)
    bar = tqdm(total=total, desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        perms = {c: {k: [v.argsort(descending=True, stable=True) for v in group]
                     for k, group in scores(dm, fit, c, bar).items()} for c in candidates}
        ref = _outputs(dm, held, ExecConfig(), bar)
        comparison: dict[str, float] = {}
        if len(candidates) > 1:
            for c in candidates:
                dm.module.permute(perms[c])
                if compensate:
                    measure(dm, fit, bar).install(dm.module, method="matrix")
                comparison[c] = _held_kl(dm, held, ref, probes, bar)
                _uninstall(dm)
                dm.module.permute(_inverse(perms[c]))
        best = min(comparison, key=comparison.get) if comparison else candidates[0]
        dm.module.permute(perms[best])
        comp = _compensation(dm, fit, held, ref, probes, branch_probes, bar) if compensate else None
        block_kl = _block_kl(dm, batches, n, bar)
        skip_orders = _skip_orders(dm, batches, block_kl, bar)
    finally:
        bar.close()
        dm.configure(previous)
    old = dm.calibration
    chosen = perms[best] if old is None else _compose(old.perms, perms[best])  # relative to the original weights
    return Calibration(criterion=best, perms={k: [p.cpu() for p in v] for k, v in chosen.items()},
                       block_kl=block_kl, skip_orders=skip_orders, comparison=comparison, n_images=n_all,
                       source=dm.source, fingerprint=fp, seconds=time.perf_counter() - t0, image_hashes=files,
                       pixel_hashes=pixels, compensation=comp)


def _split(batches: list[torch.Tensor], heldout_fraction: float, batch_size: int
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fit and held-out batches (both all images when there is only one)."""
    flat = torch.cat(batches)
    n = len(flat)
    n_held = max(1, int(round(heldout_fraction * n))) if n > 1 else 0
    if not n_held:
        return batches, batches
    return list(flat[: n - n_held].split(batch_size)), list(flat[n - n_held:].split(batch_size))


def _uninstall(dm: Any) -> None:
    compensate_.uninstall(dm.module)


def _held_kl(dm: Any, held: list[torch.Tensor], ref: torch.Tensor, probes: Sequence[ExecConfig], bar: Any) -> float:
    return sum(_kl(ref, _outputs(dm, held, p, bar)) for p in probes) / len(probes)


def _compensation(dm: Any, fit: list[torch.Tensor], held: list[torch.Tensor], ref: torch.Tensor,
                  probes: Sequence[ExecConfig], branch_probes: Sequence[ExecConfig], bar: Any) -> Compensation:
    """Statistics on the fit images; the method, skip means and branch correction chosen on the held-out ones."""
    comp = measure(dm, fit, bar)
    n = dm.space.num_blocks
    skip_probes = [ExecConfig(skip_attn=(n - 1,)), ExecConfig(skip_mlp=(n - 1,)), ExecConfig(skip_blocks=(n // 2,))]
    choose(comp, dm, probes, skip_probes, lambda cfgs: _held_kl(dm, held, ref, cfgs, bar),
           branch_probes=branch_probes)
    if comp.method != "matrix" and bar.total:  # no ridges to choose: the bar's total counted them
        bar.total -= sum(len(h) for h in held) * len(RIDGES) * len(probes)
        bar.refresh()
    return comp


def _branch_probes(dm: Any) -> list[ExecConfig]:
    """SegFormer: each decoder branch dropped alone (no probes for families without a decoder)."""
    n = dm.space.decoder_branches
    return [ExecConfig(decoder_branches=tuple(j for j in range(n) if j != i)) for i in range(n)]


SKIP_KINDS = (("block", "skip_blocks"), ("attn", "skip_attn"), ("mlp", "skip_mlp"))
GREEDY_IMAGES = 48  # the composed orders are ranked on this many calibration images (evenly spread)


def _block_kl(dm: Any, batches: list[torch.Tensor], n: int, bar: Any) -> dict[str, list[float]]:
    """KL(full || one block or sub-layer skipped) on every calibration image, as served (compensated)."""
    ref = _outputs(dm, batches, ExecConfig(), bar)
    return {kind: _kl_each(dm, batches, ref, [ExecConfig(**{key: (i,)}) for i in range(n)], bar)
            for kind, key in SKIP_KINDS}


def _skip_orders(dm: Any, batches: list[torch.Tensor], block_kl: dict[str, list[float]], bar: Any
                 ) -> dict[str, list[int]]:
    """Per kind, the first half of the blocks in composed order: each next one is the block whose skip,
    added to those already chosen, raises KL(full || path) least (the first: the single ranking's)."""
    n = len(block_kl["block"])
    flat = torch.cat(batches)
    pick = torch.linspace(0, len(flat) - 1, min(GREEDY_IMAGES, len(flat))).long()
    imgs = list(flat[pick].split(len(batches[0])))
    ref = _outputs(dm, imgs, ExecConfig(), bar)
    orders: dict[str, list[int]] = {}
    for kind, key in SKIP_KINDS:
        order = [min(range(n), key=block_kl[kind].__getitem__)]
        while len(order) < n // 2:
            cands = [j for j in range(n) if j not in order]  # ascending: neighbours share the blocks before j
            kls = _kl_each(dm, imgs, ref, [ExecConfig(**{key: tuple(sorted([*order, j]))}) for j in cands], bar)
            order.append(cands[kls.index(min(kls))])
        orders[kind] = order
    return orders


def _kl_each(dm: Any, batches: list[torch.Tensor], ref: torch.Tensor, cfgs: Sequence[ExecConfig], bar: Any
             ) -> list[float]:
    """KL(full || path) for each config in turn; consecutive paths compute the blocks they share once."""
    runner, kls = PrefixRunner(), []
    for i, cfg in enumerate(cfgs):
        impl = dm.configure(cfg).module
        with torch.no_grad():
            if impl.steps:
                save = share_depth(impl, impl.plan, dm.plan_for(cfgs[i + 1])) if i + 1 < len(cfgs) else 0
                out = torch.cat(list(runner.outputs(impl, batches, save)))
            else:
                out = torch.cat([dm(x) for x in batches])
        kls.append(_kl(ref, out))
        if bar is not None:
            bar.update(sum(len(b) for b in batches))
    return kls


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
    if calib.compensation is not None:
        calib.compensation.install(dm.base_module)
