"""One training run as ``dynavit train`` describes it: which model, which recipe, which trainer, what is saved.

``TrainJob`` holds every choice with its default; ``run_job`` builds the model (a hub/local
model, or ``config:<preset>`` with random weights and the dataset's classes), applies a
calibration, fills in the defaults that depend on the mode and the data (learning rate, crop),
and hands over to the trainer of the mode, which exports a loadable model with a model card.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynavit.data import open_dataset
from dynavit.errors import DynavitError
from dynavit.evaluation import evaluate
from dynavit.model import DynamicModel, from_config, load
from dynavit.models.configs import preset_config
from dynavit.train.distill import Distill
from dynavit.train.loop import Recipe
from dynavit.train.multiplex import train_multiplex_and_save
from dynavit.train.paths import train_paths_and_save
from dynavit.train.supervised import export, run_card, train_supervised

MODES = ("supervised", "paths", "sait", "multiplex")


@dataclass
class TrainJob:
    """Every choice of one training run (see ``dynavit train --help`` for each one's meaning)."""

    model: str  # hub id, local folder, or config:<preset> to train from scratch
    data: str | Path
    out: str | Path
    mode: str = "supervised"
    eval_data: str | Path | None = None
    steps: int = 1000
    batch_size: int = 8
    lr: float | None = None  # default: 6e-4, or 1e-5 for paths and sait (they fine-tune a trained model)
    crop: tuple[int, int] | None = None  # default: 256x320 for segmentation, else the model's input size
    input_size: tuple[int, int] | None = None
    seed: int = 0
    checkpoint_every: int = 100
    warmup: int = 50
    class_weights: str = "none"
    mux: int = 2
    arch: str = "concatplexer"
    patchifier_depth: int = 1
    labels: bool = True
    temperature: float | None = None  # default: 1 for paths and sait, 2 for multiplex
    label_weight: float = 1.0
    default_weight: float = 1.0
    space: str = "small"
    random_paths: int = 2
    densities: Sequence[float] = (0.8, 0.7, 0.6, 0.5)
    token_layers: Sequence[int] | None = None
    token_distill: float = 0.1
    calibration: str | Path | None = None
    teacher: str | None = None  # supervised: distil this model's outputs (e.g. into a model derived from it)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DynavitError(f"--mode {self.mode} does not exist; use supervised, paths, sait or multiplex")
        if self.teacher is not None and self.mode != "supervised":
            raise DynavitError(f"--teacher is for --mode supervised; --mode {self.mode} distils from MODEL itself")
        self.out = Path(self.out)


def model_to_train(model: str, dataset: Any, *, seed: int = 0, calibration: str | Path | None = None,
                   input_size: tuple[int, int] | None = None) -> DynamicModel:
    """``model`` loaded, or for ``config:<preset>`` initialised from ``seed`` with the dataset's classes."""
    if model.startswith("config:"):
        cfg = preset_config(model.removeprefix("config:"))
        cfg.num_labels = dataset.num_classes
        cfg.id2label = {i: n for i, n in enumerate(getattr(dataset, "class_names", []) or
                                                    [str(i) for i in range(dataset.num_classes)])}
        cfg.label2id = {n: i for i, n in cfg.id2label.items()}
        dm = from_config(cfg, seed=seed, source=model)
    else:
        dm = load(model)
    if calibration is not None:
        if not dm.dynamic:
            raise DynavitError(f"{model} ({dm.family}) has no execution paths to calibrate; drop --calibration")
        dm.load_calibration(calibration)
    if input_size:
        dm.input_size = tuple(input_size)
    return dm


def recipe_for(job: TrainJob, dm: DynamicModel, dataset: Any) -> Recipe:
    """The job's recipe, with the mode's learning rate and the task's crop where the job leaves them open."""
    crop = tuple(job.crop or ((256, 320) if dataset.task == "segmentation" else dm.input_size))
    lr = job.lr or (1e-5 if job.mode in ("paths", "sait") else 6e-4)
    return Recipe(steps=job.steps, batch_size=job.batch_size, lr=lr, crop=crop, seed=job.seed,
                  checkpoint_every=job.checkpoint_every, warmup=job.warmup, class_weights=job.class_weights)


def train_supervised_and_save(dm: DynamicModel, dataset: Any, out: Path, recipe: Recipe, *, name: str,
                              eval_data: str | Path | None = None, console: Any = None, teacher: str | None = None,
                              distill: Distill | None = None) -> Path:
    """Train in place (distilling ``teacher``'s outputs when given), score on ``eval_data`` if given,
    export to ``out/model`` with a model card."""
    res = train_supervised(dm, dataset, out, recipe, progress=sys.stderr.isatty(),
                           teacher=None if teacher is None else load(teacher), distill=distill)
    card = {"name": name, **run_card(dataset, recipe, res, labels=None if teacher is None else distill.use_labels)}
    if teacher is not None:
        card["teacher"] = (f"{teacher} (temperature {distill.temperature:g}, label share "
                           f"{distill.label_weight if distill.use_labels else 0:g})")
    if eval_data is not None:
        ev = evaluate(dm, open_dataset(eval_data), progress=sys.stderr.isatty())
        key = "miou" if "miou" in ev.metrics else "top1"
        m = ev.metrics[key]
        score = f"{m['value']:.4f} (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})"
        card[f"held-out {key}"] = f"{score} on {eval_data}"
        if console is not None:
            console.print(f"held-out {key} {score}")
    return export(dm, out / "model", card, console=console)


def run_job(job: TrainJob, console: Any = None) -> Path:
    """Train as ``job`` says (resuming from ``job.out/checkpoint``); the folder of the saved model."""
    dataset = open_dataset(job.data)
    dm = model_to_train(job.model, dataset, seed=job.seed, calibration=job.calibration, input_size=job.input_size)
    recipe = recipe_for(job, dm, dataset)
    if job.mode == "multiplex":
        return train_multiplex_and_save(dm, dataset, job.out, recipe, arch=job.arch, mux=job.mux,
                                        patchifier_depth=job.patchifier_depth, labels=job.labels,
                                        temperature=job.temperature or 2.0, eval_data=job.eval_data, console=console)
    if job.mode in ("paths", "sait"):
        return train_paths_and_save(dm, dataset, job.out, recipe, mode=job.mode, space=job.space,
                                    random_paths=job.random_paths, densities=job.densities,
                                    token_layers=job.token_layers, token_distill=job.token_distill,
                                    labels=job.labels, temperature=job.temperature or 1.0,
                                    label_weight=job.label_weight, default_weight=job.default_weight,
                                    eval_data=job.eval_data, console=console)
    distill = None if job.teacher is None else Distill(temperature=job.temperature or 1.0,
                                                       label_weight=job.label_weight, use_labels=job.labels)
    return train_supervised_and_save(dm, dataset, job.out, recipe, name=f"{job.model} trained on {job.data}",
                                     eval_data=job.eval_data, console=console, teacher=job.teacher, distill=distill)


__all__ = ["MODES", "TrainJob", "model_to_train", "recipe_for", "run_job", "train_supervised_and_save"]
