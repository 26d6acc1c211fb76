"""Supervised training (classification or segmentation), resumable and deterministic.

Recipe: AdamW, linear warm-up then polynomial decay (power 1.0), cross-entropy (void pixels
ignored); segmentation logits are upsampled to the crop before the loss. Everything random in
step ``s`` (batch order, augmentation, dropout / drop-path) is derived from ``(seed, s)``, so a
run resumed from its checkpoint at step ``k`` computes the same losses for steps ``k+1...`` as a
run that was never interrupted. Checkpoints are atomic (see ``checkpoint.py``).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dynavit.errors import BadSampleError, DynavitError
from dynavit.train import augment, checkpoint


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch_size: int = 8
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup: int = 50
    crop: tuple[int, int] = (256, 320)  # training crop (segmentation) or input size (classification)
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise DynavitError(f"steps and batch size must be at least 1 (got {self.steps}, {self.batch_size})")
        if not self.lr > 0:
            raise DynavitError(f"learning rate must be positive, got {self.lr}")


@dataclass
class TrainResult:
    out: Path
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)  # one per step run by this call
    seconds: float = 0.0


def _module(model: Any) -> torch.nn.Module:
    """The trainable source-library module (the dynamic forward shares its parameters)."""
    return getattr(model, "reference", None) or model.module


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(pixel_values=x) if "pixel_values" in module.forward.__code__.co_varnames else module(x)
    return out.logits if hasattr(out, "logits") else out


def _lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    return r.lr * max(0.0, 1 - (step - r.warmup) / max(1, r.steps - r.warmup))


def _check(model: Any, dataset: Any) -> None:
    if len(dataset) == 0:
        raise DynavitError(f"{getattr(dataset, 'root', 'the dataset')} has no images to train on")
    if model.task != dataset.task:
        raise DynavitError(f"a {model.task} model cannot train on a {dataset.task} dataset")
    if dataset.num_classes != model.num_labels:
        raise DynavitError(f"the dataset has {dataset.num_classes} classes but the model predicts "
                           f"{model.num_labels}; build the model with num_labels={dataset.num_classes}")


def train_supervised(model: Any, dataset: Any, out: str | Path, recipe: Recipe, *, progress: bool = True,
                     workers: int = 2, stop_after: int | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset``; checkpoints go to ``out/checkpoint`` and resume from there.

    ``stop_after`` ends this call after that many steps of the schedule (as if killed after its
    checkpoint), for tests and for splitting a long run.
    """
    _check(model, dataset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = _module(model)
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    identity = {"recipe": asdict(recipe), "data": getattr(dataset, "root", "?").__str__(), "n": len(dataset),
                "task": dataset.task}
    start, history = 0, []
    ck = out / "checkpoint"
    if checkpoint.exists(ck):
        state = checkpoint.load(ck, module, opt)
        if state.get("identity") != json.loads(json.dumps(identity)):
            raise DynavitError(f"{ck} belongs to another run ({state.get('identity')}); use another --out "
                               "or delete it")
        start, history = int(state["step"]), list(state.get("losses", []))
    seg = dataset.task == "segmentation"
    ignore = getattr(dataset, "ignore_index", 255)
    mean, std = tuple(model.mean), tuple(model.std)
    base = recipe.crop if not seg else tuple(model.input_size)
    end = recipe.steps if stop_after is None else min(recipe.steps, start + stop_after)
    device = next(module.parameters()).device
    result = TrainResult(out, recipe.steps, start)
    t0 = time.perf_counter()
    module.train()

    def sample(step: int, slot: int, idx: int) -> tuple[torch.Tensor, Any]:
        rng = np.random.default_rng([recipe.seed, step, slot])
        img, target = dataset.load(idx)
        if seg:
            return augment.segmentation_sample(img, target, recipe.crop, base, rng, mean, std, ignore)
        return augment.classification_sample(img, recipe.crop, rng, mean, std), torch.tensor(target)

    bar = tqdm(total=recipe.steps, initial=start, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for step in range(start, end):
                epoch_len = max(1, len(dataset) // recipe.batch_size)
                epoch, pos = divmod(step, epoch_len)
                order = np.random.default_rng([recipe.seed, epoch]).permutation(len(dataset))
                idx = [int(order[(pos * recipe.batch_size + k) % len(dataset)]) for k in range(recipe.batch_size)]
                try:
                    pairs = list(pool.map(sample, [step] * len(idx), range(len(idx)), idx))
                except BadSampleError as e:
                    raise DynavitError(f"cannot train on {e.path}: {e.reason}") from None
                x = torch.stack([p[0] for p in pairs]).to(device)
                y = torch.stack([p[1] for p in pairs]).to(device)
                torch.manual_seed(recipe.seed * 1_000_003 + step)  # dropout / drop-path of this step
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, recipe)
                try:
                    logits = _forward(module, x)
                    if seg:
                        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
                    loss = F.cross_entropy(logits, y, ignore_index=ignore)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                except torch.OutOfMemoryError:
                    raise DynavitError(f"out of memory at batch size {recipe.batch_size}, crop {recipe.crop}; "
                                       "lower --batch-size or --crop") from None
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DynavitError(f"the loss became {value} at step {step}; lower the learning rate")
                result.losses.append(value)
                history.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{_lr_at(step, recipe):.2e}")
                done = step + 1
                if done % recipe.checkpoint_every == 0 or done == end:
                    checkpoint.save(ck, module, opt, {"step": done, "identity": identity, "losses": history})
    finally:
        bar.close()
        module.eval()
    result.seconds = time.perf_counter() - t0
    return result


def export(model: Any, folder: str | Path, card: dict[str, Any]) -> Path:
    """Save as a Hugging Face folder that ``dynavit.load`` reads, with a markdown model card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _module(model).save_pretrained(folder, safe_serialization=True)
    h, w = model.input_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": h, "width": w}, "image_mean": list(model.mean), "image_std": list(model.std),
        "do_resize": True, "do_normalize": True}, indent=2))
    lines = [f"# {card.get('name', folder.name)}", "", "Trained by `dynavit train`.", ""]
    lines += [f"- **{k}**: {v}" for k, v in card.items() if k != "name"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return folder
