"""``dynavit train``: supervised training, weight-shared path training (paths, sait), multiplexing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynavit.cli.kit import CalibOpt, console, floats, outputs, user_errors
from dynavit.train.recipes import TrainJob, run_job

app = typer.Typer()

ModelArg = Annotated[str, typer.Argument(help="Model folder or hub id, or config:<preset> to train from scratch.")]
DataOpt = Annotated[Path, typer.Option(help="Labelled training dataset folder.")]
OutOpt = Annotated[Path, typer.Option(help="Run folder: checkpoint/ (resumed if present) and model/.")]
ModeOpt = Annotated[str, typer.Option(help="supervised; paths (weight-shared retraining of a space of execution "
                                           "paths); sait (dense/sparse token densities); multiplex (distil MODEL "
                                           "into a multiplexed model).")]
EvalOpt = Annotated[Path | None, typer.Option(help="Held-out dataset scored at the end.")]
StepsOpt = Annotated[int, typer.Option(help="Optimiser steps.")]
BatchOpt = Annotated[int, typer.Option(help="Images per step.")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, warm-up, polynomial decay); default "
                                                  "6e-4, or 1e-5 for paths and sait (they fine-tune a trained "
                                                  "model, whose default path must keep its accuracy).")]
CropOpt = Annotated[tuple[int, int] | None, typer.Option(
    help="Training crop (H W); default 256 320 (supervised), the model's input size (multiplex).")]
SizeOpt = Annotated[tuple[int, int] | None, typer.Option(help="Evaluation input size (H W) of the exported model.")]
SeedOpt = Annotated[int, typer.Option(help="Seed: batch order, augmentation, initialisation.")]
EveryOpt = Annotated[int, typer.Option(help="Steps between checkpoints.")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warm-up steps.")]
WeightsOpt = Annotated[str, typer.Option(help="segmentation: none, or median-freq (median frequency balancing, for "
                                              "class-averaged mIoU).")]
MuxOpt = Annotated[int, typer.Option(help="multiplex: images per forward pass (N).")]
ArchOpt = Annotated[str, typer.Option(help="multiplex: concatplexer or imagemux.")]
DepthOpt = Annotated[int, typer.Option(help="multiplex: ViT blocks run per image before muxing.")]
LabelsOpt = Annotated[bool, typer.Option(help="paths, sait, multiplex: use the labels (--no-labels: distil from the "
                                              "model as loaded, on images alone).")]
TempOpt = Annotated[float | None, typer.Option(help="Distillation temperature (default 1 for paths and sait, 2 for "
                                                    "multiplex).")]
LabelWOpt = Annotated[float, typer.Option(help="paths, sait: share of the label cross-entropy in the default path's "
                                               "loss; the rest distils from the model as loaded (1: labels only).")]
DefaultWOpt = Annotated[float, typer.Option(help="paths, sait: weight of the default path's loss against each other "
                                                 "path's (3 kept SaiT's dense path on Fashion-MNIST; 1 let it drop "
                                                 "1.3 pt).")]
SpaceOpt = Annotated[str, typer.Option(help="paths: search space, a preset (default, small) or JSON file.")]
RandomOpt = Annotated[int, typer.Option(help="paths, sait: random paths per step besides the default and the "
                                             "smallest.")]
DensitiesOpt = Annotated[str, typer.Option(help="sait: token keep rates, comma-separated.")]
TokenLayersOpt = Annotated[str | None, typer.Option(help="sait: blocks after which tokens are pruned, "
                                                         "comma-separated (default: 1/4, 1/2, 3/4 of the depth).")]
TeacherOpt = Annotated[str | None, typer.Option(help="supervised: distil this model's outputs on the same crops "
                                                     "(e.g. into a model `dynavit derive` cut from it); "
                                                     "--label-weight is the labels' share, --no-labels: none.")]
TokenDistillOpt = Annotated[float, typer.Option(help="sait: weight of the early token-selection distillation.")]


@app.command("train")
@user_errors
def train_cmd(model: ModelArg, data: DataOpt, out: OutOpt, mode: ModeOpt = "supervised", eval_data: EvalOpt = None,
              steps: StepsOpt = 1000, batch_size: BatchOpt = 8, lr: LrOpt = None, crop: CropOpt = None,
              input_size: SizeOpt = None, seed: SeedOpt = 0, checkpoint_every: EveryOpt = 100,
              warmup: WarmupOpt = 50, class_weights: WeightsOpt = "none", mux: MuxOpt = 2,
              arch: ArchOpt = "concatplexer", patchifier_depth: DepthOpt = 1, labels: LabelsOpt = True,
              temperature: TempOpt = None, label_weight: LabelWOpt = 1.0, default_weight: DefaultWOpt = 1.0,
              space: SpaceOpt = "small", random_paths: RandomOpt = 2, densities: DensitiesOpt = "0.8,0.7,0.6,0.5",
              token_layers: TokenLayersOpt = None, token_distill: TokenDistillOpt = 0.1,
              calibration: CalibOpt = None, teacher: TeacherOpt = None) -> None:
    """Train a model on a labelled dataset; resumable; exports a loadable model with a model card.

    --mode paths and --mode sait retrain one set of weights for many execution paths (sandwich rule,
    in-place distillation from the default path); --no-labels trains on images alone. --mode multiplex
    trains a ConcatPlexer or Image Multiplexer initialised from MODEL's weights, with MODEL as its
    teacher; attach the result with DynamicModel.add_multiplexer(OUT/model).
    """
    outputs((out, True, "--out"))
    layers = None if token_layers is None else [int(v) for v in floats(token_layers, "--token-layers")]
    job = TrainJob(model=model, data=data, out=out, mode=mode, eval_data=eval_data, steps=steps,
                   batch_size=batch_size, lr=lr, crop=crop, input_size=input_size, seed=seed,
                   checkpoint_every=checkpoint_every, warmup=warmup, class_weights=class_weights, mux=mux, arch=arch,
                   patchifier_depth=patchifier_depth, labels=labels, temperature=temperature,
                   label_weight=label_weight, default_weight=default_weight, space=space, random_paths=random_paths,
                   densities=floats(densities, "--densities"), token_layers=layers, token_distill=token_distill,
                   calibration=calibration, teacher=teacher)
    run_job(job, console=console)
