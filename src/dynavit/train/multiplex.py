"""Training a multiplexed model (ConcatPlexer / Image Multiplexer) by per-slot distillation.

The single-image model is the teacher: each image's teacher logits are the target of its slot's
output (``distill.distill_loss``: KD mixed with cross-entropy on the labels when they are used). Without labels
(``use_labels=False``) the images are only ever seen through the teacher, so any folder of
unlabelled images trains the model.

Slot order: every step, the images of each group are put in a random order (a function of
(seed, step), like everything random here), so no image position or class is tied to a slot
and the model cannot learn a slot-dependent prior. The loop, its resumability and checkpoints
are the shared ones (``loop.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dynavit.config import ExecConfig
from dynavit.data import open_dataset
from dynavit.errors import DynavitError
from dynavit.evaluation import evaluate
from dynavit.multiplex import build, save_multiplexer
from dynavit.multiplex.models import MuxModel
from dynavit.train import augment, loop
from dynavit.train.distill import Distill, distill_loss
from dynavit.train.loop import Recipe, TrainResult
from dynavit.train.supervised import classification_sampler, run_card


def slot_shuffle(batch: int, mux: int) -> torch.Tensor:
    """A permutation of ``range(batch)`` that reorders the images within each group of ``mux``."""
    order = torch.rand(batch // mux, mux).argsort(dim=1)
    return (order + torch.arange(0, batch, mux)[:, None]).flatten()


def train_multiplex(student: MuxModel, teacher: Any, dataset: Any, out: str | Path, recipe: Recipe,
                    distill: Distill = Distill(), *, progress: bool = True, workers: int = 2,
                    stop_after: int | None = None,
                    augmentation: Callable[..., torch.Tensor] = augment.classification_sample) -> TrainResult:
    """Train ``student`` in place from ``teacher`` (a single-image DynamicModel) on ``dataset``.

    ``recipe.batch_size`` counts images and must be a multiple of the student's N; ``recipe.crop``
    is the input size. Resumes from ``out/checkpoint`` like the supervised trainer.
    """
    n = student.mux
    if recipe.batch_size % n:
        raise DynavitError(f"batch size {recipe.batch_size} is not a multiple of mux={n} (images per pass)")
    if len(dataset) == 0:
        raise DynavitError(f"{getattr(dataset, 'root', 'the dataset')} has no images to train on")
    if teacher.num_labels != student.num_labels:
        raise DynavitError(f"the teacher predicts {teacher.num_labels} labels, the student {student.num_labels}")
    if distill.use_labels and dataset.num_classes != student.num_labels:
        raise DynavitError(f"the dataset has {dataset.num_classes} classes but the model predicts "
                           f"{student.num_labels}; train without labels or on a dataset with those classes")
    if hasattr(teacher, "configure"):
        teacher.configure(ExecConfig())  # the teacher is the single-image model's full path
    teacher.module.eval()
    identity = {"data": str(getattr(dataset, "root", "?")), "n": len(dataset), "task": "classification",
                "student": student.spec(), "teacher": str(getattr(teacher, "source", "?")),
                "distill": asdict(distill)}
    sample = classification_sampler(dataset, recipe, tuple(teacher.mean), tuple(teacher.std), augmentation)

    def loss(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        perm = slot_shuffle(len(x), n)
        x, y = x[perm], y[perm]
        with torch.no_grad():
            target = teacher(x)
        return distill_loss(student(x), target, y, distill)

    return loop.run(student, dataset, out, recipe, identity, sample=sample, loss=loss, progress=progress,
                    workers=workers, stop_after=stop_after, desc=f"train {student.arch} N={n}")


def train_multiplex_and_save(teacher: Any, dataset: Any, out: str | Path, recipe: Recipe, *, arch: str, mux: int,
                             patchifier_depth: int = 1, labels: bool = True, temperature: float = 2.0,
                             eval_data: str | Path | None = None, console: Any = None) -> Path:
    """What ``dynavit train --mode multiplex`` does: build from the teacher's weights, train, score, save."""
    out = Path(out)
    student = build(teacher, arch, mux, patchifier_depth)
    res = train_multiplex(student, teacher, dataset, out, recipe, Distill(temperature, use_labels=labels),
                          progress=sys.stderr.isatty())
    card = {"name": f"{arch} N={mux} distilled from {teacher.source}", "spec": json.dumps(student.spec()),
            "teacher": str(teacher.source), **run_card(dataset, recipe, res, labels)}
    if eval_data is not None:
        teacher.add_multiplexer(student)
        teacher.configure(ExecConfig(mux=mux))
        m = evaluate(teacher, open_dataset(eval_data), progress=sys.stderr.isatty()).metrics["top1"]
        teacher.configure(ExecConfig())
        card["held-out top1"] = f"{m['value']:.4f} (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f}) on {eval_data}"
        if console is not None:
            console.print(f"held-out top1 {m['value']:.4f} (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f}) at mux={mux}")
    folder = save_multiplexer(student, out / "model", card)
    if console is not None:
        console.print(f"wrote {folder} (attach it with DynamicModel.add_multiplexer, run it with mux={mux})")
    return folder
