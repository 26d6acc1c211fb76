"""Weight-shared retraining of execution paths (``--mode paths``) and SaiT dense/sparse training (``--mode sait``).

One set of weights serves every path. Each step runs (sandwich rule, Yu & Huang's slimmable
networks, as Once-For-All trains its sub-networks):
- the **default path**: cross-entropy on the labels, or, without labels, distillation from a
  frozen copy of the model as it was before training (the *anchor*), which keeps the default
  path's function while the other paths pull on the shared weights. With labels the two mix as
  ``(1 - w) * KD(anchor) + w * CE`` (``w = distill.label_weight``, 1 by default: on Fashion-MNIST
  the anchor at w = 0.5 did not keep the dense path better than labels alone, docs/results.md);
  ``default_weight`` scales this loss against each other path's: at 1, two sparse paths per step pulled
  SaiT's dense path 1.3 pt down on Fashion-MNIST in 300 steps (the dense path trained alone gained
  0.3); at 3 and 1800 steps it ended 0.3 pt up, with keep 0.7 within 0.34 pt of it;
- the **smallest path** and ``n_random`` **random paths**, each distilled in place from the
  default path's outputs of the same step (detached): ``T^2 * KL(default || path)``.
The losses are summed and one optimiser step follows, so labels are never required.

SaiT (Li et al. 2022) is the same loop over token densities: the paths are EViT-style top-k
prunings at fixed layers, one per keep rate, and the dense path is the default path (so skipping
sparsification gives the dense model). Its third ingredient, distillation for early token
selection, adds ``token_distill * mean_l KL(a_last || a_l)`` on the dense pass: the CLS attention
``a_l`` that pruning layer ``l`` ranks tokens by learns to agree with the importance the last layer
assigns (``a_last``, detached). At run time the keep rate, or a per-image threshold on cumulative
CLS attention (``token_threshold``), is chosen on the fly.

Segmentation models train the same way; their decoder BatchNorm keeps its running statistics
(dynavit's forward runs it in eval mode), as is usual when fine-tuning with small batches.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynavit.config import ExecConfig, resolve
from dynavit.cost.flops import macs_per_image
from dynavit.data import open_dataset
from dynavit.errors import DynavitError
from dynavit.evaluation import evaluate
from dynavit.knobs import compensate
from dynavit.knobs.tokens import recording_cls_attention
from dynavit.sweep.space import SearchSpace, calibrated_block_order, load_space
from dynavit.train import augment, loop
from dynavit.train.distill import Distill, attention_kd, distill_loss, kd_loss
from dynavit.train.loop import Recipe, TrainResult
from dynavit.train.supervised import export, make_sampler, run_card


@dataclass(frozen=True)
class PathSet:
    """The paths a run trains besides the default: the smallest one every step, plus random draws."""

    smallest: ExecConfig
    draw_one: Callable[[np.random.Generator], ExecConfig] = field(compare=False)
    spec: dict[str, Any]  # JSON-able description: part of the run's identity
    n_random: int = 2
    token_layers: tuple[int, ...] = ()  # SaiT: the pruning layers whose token selection is distilled

    def draw(self, rng: np.random.Generator) -> list[ExecConfig]:
        return [self.smallest] + [self.draw_one(rng) for _ in range(self.n_random)]


def space_paths(space: SearchSpace, n_random: int = 2) -> PathSet:
    """Sandwich over a sweep's search space: the last (cheapest) level of every knob, plus random points."""
    shape = space.shape

    def one(rng: np.random.Generator) -> ExecConfig:
        while True:  # any point but the default
            point = [int(rng.integers(n)) for n in shape]
            if any(point):
                return space.config(point)

    return PathSet(space.config([n - 1 for n in shape]), one, {"space": space.to_json()}, n_random)


def token_paths(keeps: Sequence[float], layers: Sequence[int], n_random: int = 1) -> PathSet:
    """SaiT's densities: top-k pruning after ``layers`` at each keep rate; the sparsest runs every step."""
    keeps = sorted({float(k) for k in keeps})
    if not keeps or not all(0 < k < 1 for k in keeps):
        raise DynavitError(f"token densities must be in (0, 1), got {list(keeps)}")
    if not layers:
        raise DynavitError("SaiT needs at least one pruning layer (--token-layers)")
    cfgs = [ExecConfig(token_method="prune", token_keep=k, token_layers=tuple(sorted(layers))) for k in keeps]
    return PathSet(cfgs[0], lambda rng: cfgs[int(rng.integers(len(cfgs)))],
                   {"token_keep": keeps, "token_layers": sorted(layers)}, n_random, tuple(sorted(layers)))


def default_token_layers(num_blocks: int) -> tuple[int, ...]:
    """Prune after blocks at 1/4, 1/2 and 3/4 of the depth (EViT prunes DeiT at 3 of 12 blocks)."""
    return tuple(sorted({max(0, round(num_blocks * f) - 1) for f in (0.25, 0.5, 0.75)}))


def _match(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Segmentation paths with another resolution give other logit sizes: resize to the teacher's."""
    if student.ndim == 4 and student.shape[-2:] != target.shape[-2:]:
        return F.interpolate(student, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return student


def _check(dm: Any, dataset: Any, paths: PathSet, use_labels: bool, token_distill: float) -> None:
    if not hasattr(dm, "configure"):
        raise DynavitError(f"{getattr(dm, 'source', 'this model')} has no execution paths to train")
    if len(dataset) == 0:
        raise DynavitError(f"{getattr(dataset, 'root', 'the dataset')} has no images to train on")
    if use_labels and dataset.task == "unlabelled":
        raise DynavitError(f"{getattr(dataset, 'root', 'the dataset')} has no labels; train on it with --no-labels")
    if dataset.task not in (dm.task, "unlabelled") and use_labels:
        raise DynavitError(f"a {dm.task} model cannot train on the labels of a {dataset.task} dataset; "
                           "use --no-labels to train on its images alone")
    if use_labels and dataset.num_classes != dm.num_labels:
        raise DynavitError(f"the dataset has {dataset.num_classes} classes but the model predicts {dm.num_labels}; "
                           "train without labels (--no-labels) or on a dataset with those classes")
    for cfg in (paths.smallest, *(paths.draw_one(np.random.default_rng(i)) for i in range(4))):
        resolve(cfg, dm.space)  # a path the model cannot run fails here, not at step 1
    if token_distill and not dm.space.cls_token:
        raise DynavitError("token-selection distillation needs a CLS-token ViT (its pruning reads CLS attention)")
    if paths.token_layers and max(paths.token_layers) >= dm.space.num_blocks - 1:
        raise DynavitError(f"pruning layers {list(paths.token_layers)} must be before the last block "
                           f"({dm.space.num_blocks - 1})")


def _anchor(dm: Any, default: ExecConfig) -> Any:
    """A frozen copy of ``dm`` on its default path: the model before training, which anchors that path."""
    teacher = copy.deepcopy(dm).configure(default)
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    teacher.module.eval()
    return teacher


def _identity(dm: Any, dataset: Any, paths: PathSet, distill: Distill, token_distill: float,
              default_weight: float) -> dict[str, Any]:
    """What names a run (a checkpoint of another run is refused)."""
    identity = {"data": str(getattr(dataset, "root", "?")), "n": len(dataset), "task": dataset.task,
                "model": str(getattr(dm, "source", "?")), "paths": paths.spec, "n_random": paths.n_random,
                "distill": asdict(distill), "token_distill": token_distill}
    if default_weight != 1.0:  # absent at 1, so runs from before the option existed still resume
        identity["default_weight"] = default_weight
    return identity


def _drop_compensation(dm: Any) -> None:
    """The corrections were solved from the weights as calibrated; training moves them, and the paths
    learn to do without (a correction solved under inference mode would also refuse autograd)."""
    if getattr(dm.calibration, "compensation", None) is not None:
        compensate.uninstall(dm.module)
        dm.calibration.compensation = None


def train_paths(dm: Any, dataset: Any, out: str | Path, recipe: Recipe, paths: PathSet, *,
                distill: Distill = Distill(temperature=1.0, label_weight=1.0), token_distill: float = 0.0,
                default_weight: float = 1.0, progress: bool = True, workers: int = 2, stop_after: int | None = None,
                augmentation: Callable[..., torch.Tensor] = augment.classification_sample) -> TrainResult:
    """Train the weights ``dm`` shares between its paths, in place; resumable from ``out/checkpoint``.

    ``distill.use_labels=False`` trains on images alone (any unlabelled folder works); with labels,
    ``distill.label_weight`` is the cross-entropy's share of the default path's loss (1: labels only,
    no anchor to the model as it was). ``default_weight`` scales the default path's loss against each
    other path's.
    ``token_distill`` > 0 adds SaiT's early token-selection distillation at ``paths.token_layers``.
    A calibration's compensation is dropped first (``_drop_compensation``).
    """
    use_labels = distill.use_labels
    _check(dm, dataset, paths, use_labels, token_distill)
    _drop_compensation(dm)
    if not default_weight > 0:
        raise DynavitError(f"the default path's loss weight must be positive, got {default_weight}")
    default = ExecConfig()
    dm.configure(default)
    module = dm.module
    teacher = _anchor(dm, default) if not use_labels or distill.label_weight < 1 else None
    ignore = getattr(dataset, "ignore_index", 255)
    seg = dm.task == "segmentation"
    identity = _identity(dm, dataset, paths, distill, token_distill, default_weight)
    sample = make_sampler(dm, dataset, recipe, augmentation)
    t = distill.temperature

    def loss(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        rng = np.random.default_rng([recipe.seed, step, 0x9A7])
        dm.configure(default)
        with recording_cls_attention(module) if token_distill else nullcontext() as record:
            out = dm(x)
        up = (lambda z: F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)) if seg and \
            use_labels else (lambda z: z)  # segmentation labels are full-size; compare logits at their size
        if teacher is None:  # labels only
            total = F.cross_entropy(up(out), y, ignore_index=ignore)
        else:
            with torch.no_grad():
                target = teacher(x)
            total = distill_loss(up(out), up(target), y if use_labels else None, distill, ignore)
        total = default_weight * total
        if token_distill:
            late = record[-1].detach()
            total = total + token_distill * torch.stack(
                [attention_kd(record[i], late) for i in paths.token_layers]).mean()
        anchor = out.detach()
        for cfg in paths.draw(rng):
            dm.configure(cfg)
            total = total + kd_loss(_match(dm(x), anchor), anchor, t)
        dm.configure(default)
        return total

    desc = "train sait" if paths.token_layers else "train paths"
    try:
        return loop.run(module, dataset, out, recipe, identity, sample=sample, loss=loss, progress=progress,
                        workers=workers, stop_after=stop_after, desc=desc)
    finally:
        dm.configure(default)


def _score(dm: Any, data: Any, cfgs: dict[str, ExecConfig]) -> dict[str, tuple[float, float]]:
    """(quality, GMACs per image) of each named path on ``data``: top-1 or mIoU."""
    probe = torch.zeros(1, 3, *dm.input_size)
    scores = {}
    for name, cfg in cfgs.items():
        dm.configure(cfg)
        ev = evaluate(dm, data, progress=False)
        key = "miou" if "miou" in ev.metrics else "top1"
        with torch.no_grad():
            gmacs = sum(macs_per_image(dm.module, probe).values()) / 1e9
        scores[name] = (ev.metrics[key]["value"], gmacs)
    dm.configure(ExecConfig())
    return scores


def train_paths_and_save(dm: Any, dataset: Any, out: str | Path, recipe: Recipe, *, mode: str, space: str = "small",
                         random_paths: int = 2, densities: Sequence[float] = (0.8, 0.7, 0.6, 0.5),
                         token_layers: Sequence[int] | None = None, token_distill: float = 0.1, labels: bool = True,
                         temperature: float = 1.0, label_weight: float = 1.0, default_weight: float = 1.0,
                         eval_data: str | Path | None = None, console: Any = None) -> Path:
    """What ``dynavit train --mode paths|sait`` does: score before, train, score after, export with a card."""
    if not hasattr(dm, "configure"):
        raise DynavitError(f"{getattr(dm, 'source', 'this model')} has no execution paths to train")
    if mode == "paths":
        paths = space_paths(load_space(space, dm.space, calibrated_block_order(dm.calibration)), random_paths)
        token_distill = 0.0
    else:
        paths = token_paths(densities, token_layers or default_token_layers(dm.space.num_blocks), random_paths)
    out = Path(out)
    named = {"default": ExecConfig(), "smallest": paths.smallest}
    held_out = None
    before: dict[str, tuple[float, float]] = {}
    if eval_data is not None:
        held_out = open_dataset(eval_data)
        before = _score(dm, held_out, named)
    res = train_paths(dm, dataset, out, recipe, paths, distill=Distill(temperature, label_weight, labels),
                      token_distill=token_distill, default_weight=default_weight, progress=sys.stderr.isatty())
    card = {"name": f"{dm.source}, {mode} training", **run_card(dataset, recipe, res, labels),
            "paths": json.dumps(paths.spec), "smallest path": paths.smallest.to_json(),
            "token-selection distillation weight": str(token_distill), "temperature": str(temperature),
            "default path loss weight": f"{default_weight:g} x each other path's",
            "default path loss": (f"{1 - label_weight:g} x KD from the model as loaded + {label_weight:g} x "
                                  "cross-entropy" if labels else "KD from the model as loaded")}
    if dm.calibration is not None:
        card["calibration"] = ("applied before training; the exported weights are in importance order; no "
                               "compensation (the trained paths do without it)")
    if held_out is not None:
        after = _score(dm, held_out, named)
        for name in named:
            (q0, g), (q1, _) = before[name], after[name]
            card[f"held-out {name} path"] = f"{q0:.4f} before, {q1:.4f} after ({g:.3f} GMACs/image) on {eval_data}"
            if console is not None:
                console.print(f"{name} path ({g:.3f} GMACs): {q0:.4f} before -> {q1:.4f} after")
    return export(dm, out / "model", card, console=console)


__all__ = ["PathSet", "default_token_layers", "space_paths", "token_paths", "train_paths", "train_paths_and_save"]
