"""Supervised training (classification or segmentation), resumable and deterministic.

Recipe: AdamW, linear warm-up then polynomial decay (power 1.0), cross-entropy (void pixels
ignored); segmentation logits are upsampled to the crop before the loss. Optional median
frequency balancing (Eigen & Fergus 2015, as SegNet trains on CamVid) weighs class c by
median(freq) / freq(c): mIoU averages classes, and thin rare classes (poles, signs, cyclists)
are otherwise drowned by road and sky. With a teacher, the loss distils its outputs on the same
crops (``distill.distill_loss``), the labels' cross-entropy weighted in or left out. The loop, its
determinism per (seed, step) and its atomic checkpoints are shared with the other trainers
(``loop.py``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynavit.errors import DynavitError
from dynavit.train import augment, loop
from dynavit.train.distill import Distill, distill_loss
from dynavit.train.loop import Recipe, TrainResult

__all__ = ["Recipe", "TrainResult", "export", "make_sampler", "median_frequency_weights", "run_card",
           "train_supervised"]


def _module(model: Any) -> torch.nn.Module:
    """The trainable source-library module (the dynamic forward shares its parameters)."""
    return getattr(model, "reference", None) or model.module


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(pixel_values=x) if "pixel_values" in module.forward.__code__.co_varnames else module(x)
    return out.logits if hasattr(out, "logits") else out


def _check(model: Any, dataset: Any) -> None:
    if len(dataset) == 0:
        raise DynavitError(f"{getattr(dataset, 'root', 'the dataset')} has no images to train on")
    if dataset.task == "unlabelled":
        raise DynavitError(f"{getattr(dataset, 'root', 'the dataset')} has no labels; supervised training needs "
                           "them (--mode paths, sait or multiplex with --no-labels train on images alone)")
    if model.task != dataset.task:
        raise DynavitError(f"a {model.task} model cannot train on a {dataset.task} dataset")
    if dataset.num_classes != model.num_labels:
        raise DynavitError(f"the dataset has {dataset.num_classes} classes but the model predicts "
                           f"{model.num_labels}; build the model with num_labels={dataset.num_classes}")


def classification_sampler(dataset: Any, recipe: Recipe, mean: tuple, std: tuple,
                           augmentation: Callable[..., torch.Tensor] = augment.classification_sample,
                           ) -> Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``sample(step, slot, index)`` for classification: (augmented pixels, label), random per (seed, step, slot)."""
    def sample(step: int, slot: int, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, target = dataset.load(idx)
        rng = loop.sample_rng(recipe.seed, step, slot)
        return augmentation(img, recipe.crop, rng, mean, std), torch.tensor(target)

    return sample


def make_sampler(model: Any, dataset: Any, recipe: Recipe,
                 augmentation: Callable[..., torch.Tensor] = augment.classification_sample,
                 ) -> Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``sample(step, slot, index)`` for ``dataset``'s task, normalised with ``model``'s statistics.

    Segmentation: random scale of the model's input size, crop ``recipe.crop``, flip, jitter.
    Classification: ``augmentation`` (random-resized crop to ``recipe.crop`` by default).
    """
    mean, std = tuple(model.mean), tuple(model.std)
    task = model.task if dataset.task == "unlabelled" else dataset.task  # images alone: augment as the model needs
    if task != "segmentation":
        return classification_sampler(dataset, recipe, mean, std, augmentation)
    base, ignore = tuple(model.input_size), getattr(dataset, "ignore_index", 255)
    ignore = ignore if ignore >= 0 else 255  # unlabelled images: the void value of the blank label maps

    def sample(step: int, slot: int, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, target = dataset.load(idx)
        if not isinstance(target, np.ndarray):  # no label map: an all-void one keeps the crops aligned
            target = np.full((img.height, img.width), ignore, np.int64)
        rng = loop.sample_rng(recipe.seed, step, slot)
        return augment.segmentation_sample(img, target, recipe.crop, base, rng, mean, std, ignore)

    return sample


def median_frequency_weights(dataset: Any, num_classes: int) -> torch.Tensor:
    """Per-class loss weights median(f) / f(c), f(c) = pixels of c / pixels of images containing c."""
    pixels = np.zeros(num_classes, np.float64)
    present = np.zeros(num_classes, np.float64)
    for i in range(len(dataset)):
        target = np.asarray(dataset.load(i)[1])
        counts = np.bincount(target[(target >= 0) & (target < num_classes)].ravel(), minlength=num_classes)
        pixels += counts
        present += (counts > 0) * target.size
    if (pixels == 0).any():
        missing = [str(c) for c in np.flatnonzero(pixels == 0)]
        raise DynavitError(f"classes {', '.join(missing)} never occur in the training labels; "
                           "median-frequency weights need every class (use --class-weights none)")
    freq = pixels / present
    return torch.tensor(np.median(freq) / freq, dtype=torch.float32)


def train_supervised(model: Any, dataset: Any, out: str | Path, recipe: Recipe, *, progress: bool = True,
                     workers: int = 2, stop_after: int | None = None,
                     augmentation: Callable[..., torch.Tensor] = augment.classification_sample,
                     teacher: Any = None, distill: Distill | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset``; checkpoints go to ``out/checkpoint`` and resume from there.

    ``stop_after`` ends this call after that many steps of the schedule (as if killed after its
    checkpoint), for tests and for splitting a long run. ``augmentation`` replaces the
    classification augmentation (same signature as ``augment.classification_sample``).
    ``teacher``: a model whose outputs on the same crops ``model`` learns (``distill``: temperature and
    the labels' share; without labels, the images alone), e.g. a large model teaching one derived from it.
    """
    _check(model, dataset)
    module = _module(model)
    seg = dataset.task == "segmentation"
    ignore = getattr(dataset, "ignore_index", 255)
    identity = {"data": str(getattr(dataset, "root", "?")), "n": len(dataset), "task": dataset.task}
    if teacher is not None:
        distill = distill or Distill()
        identity["teacher"] = {"model": str(getattr(teacher, "source", "?")), **dataclasses.asdict(distill)}
        teacher_module = _module(teacher).eval()
    sample = make_sampler(model, dataset, recipe, augmentation)

    weight = None
    if seg and recipe.class_weights == "median-freq":
        weight = median_frequency_weights(dataset, model.num_labels).to(next(module.parameters()).device)

    def loss(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        logits = _forward(module, x)
        if seg:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        if teacher is None:
            return F.cross_entropy(logits, y, weight=weight, ignore_index=ignore)
        with torch.no_grad():
            t = _forward(teacher_module, x)
            t = F.interpolate(t, size=y.shape[-2:], mode="bilinear", align_corners=False) if seg else t
        return distill_loss(logits, t, y, distill, ignore_index=ignore if seg else -100)

    return loop.run(module, dataset, out, recipe, identity, sample=sample, loss=loss, progress=progress,
                    workers=workers, stop_after=stop_after)


def run_card(dataset: Any, recipe: Recipe, result: TrainResult, labels: bool | None = None) -> dict[str, str]:
    """The model-card fields every trainer records: data, recipe, command, wall time, final loss."""
    used = "" if labels is None else f", labels {'used' if labels else 'not used'}"
    return {"data": f"{getattr(dataset, 'root', '?')} ({len(dataset)} images{used})",
            "recipe": json.dumps(recipe.__dict__), "command": " ".join(sys.argv),
            "wall time (this call)": f"{result.seconds:.0f} s",
            "training time (all calls)": "not recorded (resumed from an older checkpoint)"
            if result.total_seconds is None else f"{result.total_seconds:.0f} s",
            "final loss": f"{result.losses[-1]:.4f}" if result.losses else "n/a (already trained)"}


def export(model: Any, folder: str | Path, card: dict[str, Any], *, half: bool = False, console: Any = None) -> Path:
    """``model.save_pretrained(folder, half=half)`` plus a markdown model card (``README.md``) of ``card``;
    ``console`` (a rich console) is told where it went."""
    folder = model.save_pretrained(folder, half=half)
    lines = [f"# {card.get('name', folder.name)}", "", "Trained by `dynavit train`.", ""]
    lines += [f"- **{k}**: {v}" for k, v in card.items() if k != "name"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        console.print(f"wrote {folder} (load it with dynavit.load)")
    return folder
