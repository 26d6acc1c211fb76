"""The training loop every trainer shares: resumable, deterministic, checkpointed, with a progress bar.

A trainer supplies two functions: ``sample(step, slot, index)`` (one augmented example, drawing
its randomness from ``sample_rng(seed, step, slot)``) and ``loss(x, y, step)``. Everything random
in step ``s`` (batch order, augmentation, dropout, slot order) is derived from ``(seed, s)``, so a
run resumed from its checkpoint at step ``k`` computes the same losses for steps ``k+1...`` as a
run that was never interrupted. A run killed at any point, even in the middle of saving a checkpoint,
resumes from the newest complete checkpoint (see ``checkpoint.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynavit.errors import BadSampleError, DynavitError
from dynavit.train import checkpoint


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
    class_weights: str = "none"  # segmentation: "none" or "median-freq" (SegNet's median frequency balancing)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise DynavitError(f"steps and batch size must be at least 1 (got {self.steps}, {self.batch_size})")
        if not self.lr > 0:
            raise DynavitError(f"learning rate must be positive, got {self.lr}")
        if self.class_weights not in ("none", "median-freq"):
            raise DynavitError(f"class weights must be 'none' or 'median-freq', got {self.class_weights!r}")


@dataclass
class TrainResult:
    out: Path
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)  # one per step run by this call
    seconds: float = 0.0
    total_seconds: float | None = None  # training time over every call of the run (None: an older checkpoint)


def lr_at(step: int, r: Recipe) -> float:
    """Linear warm-up, then linear (polynomial power 1) decay to 0 at the last step."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    return r.lr * max(0.0, 1 - (step - r.warmup) / max(1, r.steps - r.warmup))


def sample_rng(seed: int, step: int, slot: int) -> np.random.Generator:
    """The generator of one example's augmentation: a function of (seed, step, slot) only."""
    return np.random.default_rng([seed, step, slot])


def batch_indices(step: int, n: int, r: Recipe) -> list[int]:
    """Dataset indices of step ``step``: a fresh permutation per epoch, derived from (seed, epoch)."""
    epoch, pos = divmod(step, max(1, n // r.batch_size))
    order = np.random.default_rng([r.seed, epoch]).permutation(n)
    return [int(order[(pos * r.batch_size + k) % n]) for k in range(r.batch_size)]


def optimizer(module: torch.nn.Module, r: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings of rank 1."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": r.weight_decay},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=r.lr)


def run(module: torch.nn.Module, dataset: Any, out: str | Path, recipe: Recipe, identity: dict[str, Any], *,
        sample: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]],
        loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], progress: bool = True, workers: int = 2,
        stop_after: int | None = None, desc: str = "train") -> TrainResult:
    """Train ``module`` in place; checkpoints go to ``out/checkpoint`` and a run resumes from there.

    ``identity`` (JSON-able) names the run: a checkpoint of another run is refused. ``stop_after``
    ends this call after that many steps (as if killed after its checkpoint).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opt = optimizer(module, recipe)
    identity = {"recipe": asdict(recipe), **identity}
    ck = out / "checkpoint"
    start, history, before = _resume(ck, module, opt, identity)
    end = recipe.steps if stop_after is None else min(recipe.steps, start + stop_after)
    device = next(module.parameters()).device
    result = TrainResult(out, recipe.steps, start)
    t0 = time.perf_counter()
    module.train()
    bar = tqdm(total=recipe.steps, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for step in range(start, end):
                x, y = _batch(pool, sample, len(dataset), step, recipe, device)
                value = _optimise(opt, loss, x, y, step, recipe)
                result.losses.append(value)
                history.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr_at(step, recipe):.2e}")
                done = step + 1
                if done % recipe.checkpoint_every == 0 or done == end:
                    spent = None if before is None else before + time.perf_counter() - t0
                    checkpoint.save(ck, module, opt, {"step": done, "identity": identity, "losses": history,
                                                      "train_seconds": spent})
    finally:
        bar.close()
        module.eval()
    result.seconds = time.perf_counter() - t0
    result.total_seconds = None if before is None else before + result.seconds
    return result


def _resume(ck: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, identity: dict[str, Any]
            ) -> tuple[int, list[float], float | None]:
    """(first step, losses so far, training seconds so far) from the checkpoint ``ck``, if there is one.

    The seconds are ``None`` for a checkpoint written before they were recorded.
    """
    if not checkpoint.exists(ck):
        return 0, [], 0.0
    state = checkpoint.load(ck, module, opt)
    if state.get("identity") != json.loads(json.dumps(identity)):
        raise DynavitError(f"{ck} belongs to another run ({state.get('identity')}); use another --out "
                           "or delete it")
    start, history = int(state["step"]), list(state.get("losses", []))
    return start, history, state.get("train_seconds") if start else 0.0


def _batch(pool: ThreadPoolExecutor, sample: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]], n: int,
           step: int, recipe: Recipe, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s inputs and targets on ``device``, its examples drawn in parallel on ``pool``."""
    idx = batch_indices(step, n, recipe)
    try:
        pairs = list(pool.map(sample, [step] * len(idx), range(len(idx)), idx))
    except BadSampleError as e:
        raise DynavitError(f"cannot train on {e.path}: {e.reason}") from None
    x = torch.stack([p[0] for p in pairs]).to(device)
    y = torch.stack([p[1] for p in pairs]).to(device)
    return x, y


def _optimise(opt: torch.optim.Optimizer, loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
              x: torch.Tensor, y: torch.Tensor, step: int, recipe: Recipe) -> float:
    """One optimiser step on the batch; returns the loss, refused when it is not finite."""
    torch.manual_seed(recipe.seed * 1_000_003 + step)  # dropout / drop-path / slot order of this step
    for g in opt.param_groups:
        g["lr"] = lr_at(step, recipe)
    try:
        value_t = loss(x, y, step)
        opt.zero_grad(set_to_none=True)
        value_t.backward()
        opt.step()
    except torch.OutOfMemoryError:
        raise DynavitError(f"out of memory at batch size {recipe.batch_size}, crop {recipe.crop}; "
                           "lower --batch-size or --crop") from None
    value = float(value_t.detach())
    if not math.isfinite(value):
        raise DynavitError(f"the loss became {value} at step {step}; lower the learning rate")
    return value
