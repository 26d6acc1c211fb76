"""Helpers shared by the execution-path tests of every family."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dynavit.config import ExecConfig
from dynavit.sweep.store import Row


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the acceptance measure for reproducing a source model."""
    return float((a - b).norm() / b.norm())


def ref_logits(hf, x: torch.Tensor, **kw) -> torch.Tensor:
    """Logits of a transformers model, without autograd."""
    with torch.no_grad():
        return hf(pixel_values=x, **kw).logits


def ours(dm, x: torch.Tensor, cfg: ExecConfig | None = None) -> torch.Tensor:
    """Logits of a DynamicModel on ``cfg`` (default path when None)."""
    dm.configure(cfg or ExecConfig())
    with torch.no_grad():
        return dm(x)


def vit_macs(dm, cfg: ExecConfig, h: int, w: int, token_counts: list[int] | None = None,
             merge_counts: list[int] | None = None) -> int:
    """Analytic MACs of a transformers ViT on its configured path (``cfg`` is not read).

    ``token_counts[i]``: tokens entering block i's MLP; ``merge_counts[i]``: tokens entering block i's
    bipartite matching ("prune+merge": after the pruning; default: all of them).
    """
    c = dm.reference.config
    d, p = c.hidden_size, c.patch_size
    hd = d // c.num_attention_heads
    n = (h // p) * (w // p)
    macs = n * d * 3 * p * p
    t = n + 1
    plan = dm.module.plan
    for i, bp in enumerate(plan.blocks):
        t_mlp = token_counts[i] if token_counts else t
        if bp.attn:
            a = bp.heads * hd
            macs += 3 * t * d * a + t * a * d + 2 * t * t * a
            if bp.token_op and bp.token_op != "merge":
                macs += t * a  # CLS attention row: q_cls . k^T
                if plan.token_fuse:
                    macs += (t - 1) * d  # EViT fusion: attention-weighted sum of the patch tokens
            if bp.token_op and "merge" in bp.token_op:
                tm = merge_counts[i] if merge_counts else t
                macs += ((tm + 1) // 2) * (tm // 2) * hd  # bipartite similarity of the head-mean keys
        if bp.mlp:
            macs += 2 * t_mlp * d * bp.mlp_dim
        t = t_mlp
    return macs + d * c.num_labels


def require(module: str):
    """Import an optional dependency the dev install provides: fail under CI if missing, else skip."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (it is in the dev extra)")
        pytest.skip(f"{module} is not installed")


def make_row(cfg: ExecConfig, hits: np.ndarray, macs: float, **kw) -> Row:
    """A synthetic sweep row (classification) for store, Pareto and controller tests; ``kw`` overrides."""
    q = float(hits[:, 0].mean())
    fields = dict(config=cfg, quality=q, quality_lo=q - 0.05, quality_hi=q + 0.05, metrics={"top1": {"value": q}},
                  macs=macs, macs_by_class={"linear": macs}, latency_p50_ms=1.0, latency_p95_ms=1.2, batch=8,
                  batch_p50_ms=5.0, batch_p95_ms=6.0, images_per_s=1600.0, per_image=hits, device="cpu:test",
                  versions={"dynavit": "0"}, label=str(cfg.to_dict()))
    fields.update(kw)
    return Row(**fields)


# A tiny random ViT and a synthetic labelled dataset it can learn, for trainers' unit tests.
D, SIZE, PATCH, LABELS = 32, 16, 4, 5


def tiny_vit(seed: int = 0, dim: int = D, layers: int = 3):
    from transformers import ViTConfig

    from dynavit.model import from_config

    cfg = ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=2,
                    intermediate_size=2 * dim, num_labels=LABELS)
    lm = from_config(cfg, seed=seed)
    lm.crop_pct = 1.0
    return lm



class Shapes:
    """A labelled synthetic dataset: the class decides the brightness of a random texture."""

    task, num_classes, root = "classification", LABELS, "synthetic"

    def __init__(self, n: int = 24) -> None:
        rng = np.random.default_rng(0)
        self.labels = [i % LABELS for i in range(n)]
        self.arrays = [np.clip(rng.normal(40 + 40 * y, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                       for y in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.arrays[i]), self.labels[i]


def save_class_folders(data, folder) -> None:
    """Write a labelled dataset (``load(i)``: image, label) as ``folder/c<label>/<i>.png`` (class folders)."""
    for i in range(len(data)):
        img, y = data.load(i)
        (folder / f"c{y}").mkdir(parents=True, exist_ok=True)
        img.save(folder / f"c{y}" / f"{i}.png")


def damage_sqlite(path) -> None:
    """Overwrite the header of every page of an SQLite file after the first: any read of a table fails."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    for page in range(1, len(data) // size):
        data[page * size: page * size + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def child_env() -> dict[str, str]:
    """This process's environment for a child run from another folder (PYTHONPATH made absolute)."""
    from pathlib import Path

    path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
