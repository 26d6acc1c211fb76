"""Score a model on a dataset: exact top-k accuracy or mIoU, with bootstrap confidence intervals.

Decoding, batching and scoring are ``dynavit.pipeline``'s, the same a sweep uses; this module
runs the model over the batches and reports what it measured.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynavit.errors import DynavitError
from dynavit.pipeline import Scorer, batches, check_compatible, dataset_name, model_name, placement, torch_module


@dataclass
class EvalResult:
    """What one evaluation measured; ``metrics`` fractions are in [0, 1]."""

    metrics: dict[str, Any]
    n_images: int
    n_skipped: int
    skipped: list[str]
    seconds: float
    images_per_s: float
    task: str = ""
    dataset: dict[str, Any] | None = None
    transform: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (NaN -> None, numpy -> Python, paths -> str)."""
        return _jsonable(asdict(self))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def evaluate(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    skip_bad: bool = False,
    progress: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 2,
) -> EvalResult:
    """Run ``model`` over ``dataset`` and score it.

    ``model`` needs ``task``, ``num_labels``, ``transform`` (PIL -> (3, H, W) tensor) and
    ``__call__(pixels) -> logits``: (B, num_labels) for classification, (B, num_labels, h, w)
    at any resolution for segmentation. Segmentation logits are upsampled bilinearly
    (align_corners=False) to each label's own size before the argmax, so IoU is measured at
    the annotation's resolution. Images are batched only while their transformed sizes agree.

    A file that cannot be decoded raises ``BadSampleError`` naming it, unless ``skip_bad``,
    in which case it is left out and listed in ``skipped``. ``limit`` scores that many images
    spread over the dataset.
    """
    check_compatible(model, dataset)
    dataset = _limited(dataset, limit)
    scorer = _scorer(model, dataset)
    skipped: list[str] = []
    start = time.perf_counter()
    _run(model, dataset, scorer, skipped, batch_size=batch_size, skip_bad=skip_bad, progress=progress,
         workers=workers)
    seconds = time.perf_counter() - start
    if scorer.n == 0:
        raise DynavitError(f"no image of {dataset_name(dataset)} could be read ({len(skipped)} skipped)")
    transform = model.transform
    return EvalResult(
        metrics=scorer.result(n_boot=n_boot, seed=seed),
        n_images=scorer.n,
        n_skipped=len(skipped),
        skipped=skipped,
        seconds=seconds,
        images_per_s=scorer.n / seconds if seconds > 0 else math.inf,
        task=dataset.task,
        dataset=dataset.describe() if hasattr(dataset, "describe") else None,
        transform=transform.to_dict() if hasattr(transform, "to_dict") else None,
        extra={"model": model_name(model), "batch_size": batch_size, "n_boot": n_boot, "seed": seed},
    )


def _limited(dataset: Any, limit: int | None) -> Any:
    """``limit`` images spread over the dataset (the first ones where it cannot spread them)."""
    if limit is None:
        return dataset
    return dataset.limit(limit) if hasattr(dataset, "limit") else dataset.subset(range(min(limit, len(dataset))))


def _scorer(model: Any, dataset: Any) -> Scorer:
    """The dataset's scorer; warns when a segmentation model predicts labels the dataset cannot score."""
    num_classes = dataset.num_classes
    if dataset.task == "segmentation" and model.num_labels > num_classes:
        warnings.warn(
            f"{model_name(model)} has {model.num_labels} labels but the dataset defines {num_classes}; "
            f"only the first {num_classes} are scored",
            stacklevel=3,
        )
    return Scorer(dataset.task, model.num_labels, num_classes, getattr(dataset, "ignore_index", 255))


def _run(model: Any, dataset: Any, scorer: Scorer, skipped: list[str], *, batch_size: int, skip_bad: bool,
         progress: bool, workers: int) -> None:
    """Every batch through the model in eval mode under ``inference_mode``; the module's mode is restored."""
    module = torch_module(model)
    device, dtype = placement(model, module)
    was_training = module.training if module is not None else False
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        stream = batches(dataset, model.transform, batch_size=batch_size, skip_bad=skip_bad, skipped=skipped,
                         bar=bar, workers=workers)
        if module is not None:
            module.eval()
        with torch.inference_mode(), contextlib.closing(stream):
            for batch in stream:
                scorer.update(model(batch.pixels.to(device=device, dtype=dtype)), batch.targets)
                bar.update(len(batch))
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
