"""Score a model on a dataset: exact top-k accuracy or mIoU, with bootstrap confidence intervals.

Decoding and preprocessing run in a thread pool (PIL and torch release the GIL) while the main
thread runs the model, so a CPU-bound decode does not leave the accelerator idle. Results are
kept in dataset order, so runs are deterministic whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynavit.data.metrics import ClassificationMeter, SegmentationMeter
from dynavit.errors import BadSampleError, DynavitError


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


@dataclass
class _Sample:
    index: int
    pixels: torch.Tensor | None
    target: Any
    error: BadSampleError | None = None


def _torch_module(model: Any) -> nn.Module | None:
    """The nn.Module behind a model (itself, or a wrapper's ``module``), for device and eval mode."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else None


def _placement(model: Any, module: nn.Module | None) -> tuple[torch.device, torch.dtype]:
    """Where inputs must go: the model's ``device`` attribute, else its first parameter's."""
    param = next(module.parameters(), None) if module is not None else None
    device = getattr(model, "device", None)
    if not isinstance(device, str | torch.device):
        device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.device(device), dtype


def _model_name(model: Any) -> str:
    return str(getattr(model, "source", None) or type(model).__name__)


def _check_compatible(model: Any, dataset: Any) -> None:
    name, where = _model_name(model), getattr(dataset, "root", "the dataset")
    if model.task != dataset.task:
        raise DynavitError(
            f"{name} is a {model.task} model but {where} is a {dataset.task} dataset; "
            f"evaluate a {dataset.task} model on it"
        )
    if dataset.num_classes > model.num_labels:
        raise DynavitError(
            f"{where} has {dataset.num_classes} classes but {name} predicts only {model.num_labels} labels; "
            "use a model trained for this dataset's classes"
        )


def _decode(dataset: Any, transform: Callable[[Any], torch.Tensor], i: int) -> _Sample:
    try:
        img, target = dataset.load(i)
        return _Sample(i, transform(img), target)
    except BadSampleError as err:
        return _Sample(i, None, None, err)


def _stream(
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    indices: Sequence[int],
    workers: int,
    prefetch: int,
) -> Iterator[_Sample]:
    """Decoded samples in order, with up to ``prefetch`` decodes in flight on ``workers`` threads."""
    if workers <= 0:
        for i in indices:
            yield _decode(dataset, transform, i)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="dynavit-decode") as pool:
        todo = iter(indices)
        pending: deque[Future[_Sample]] = deque(
            pool.submit(_decode, dataset, transform, i) for i in islice(todo, prefetch)
        )
        try:
            while pending:
                done = pending.popleft()
                for i in islice(todo, 1):
                    pending.append(pool.submit(_decode, dataset, transform, i))
                yield done.result()
        finally:  # stopped early (error or abandoned): do not decode the rest
            for fut in pending:
                fut.cancel()


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
    _check_compatible(model, dataset)
    if batch_size < 1:
        raise DynavitError(f"batch_size must be at least 1, got {batch_size}")
    if limit is not None:
        dataset = (
            dataset.limit(limit)
            if hasattr(dataset, "limit")
            else dataset.subset(range(min(limit, len(dataset))))
        )

    segmentation = dataset.task == "segmentation"
    num_classes = dataset.num_classes
    if segmentation and model.num_labels > num_classes:
        warnings.warn(
            f"{_model_name(model)} has {model.num_labels} labels but the dataset defines {num_classes}; "
            f"only the first {num_classes} are scored",
            stacklevel=2,
        )
    meter: ClassificationMeter | SegmentationMeter = (
        SegmentationMeter(num_classes, dataset.ignore_index)
        if segmentation
        else ClassificationMeter(model.num_labels)
    )
    transform = model.transform
    module = _torch_module(model)
    device, dtype = _placement(model, module)
    was_training = module.training if module is not None else False
    skipped: list[str] = []
    batch: list[_Sample] = []

    def run_batch() -> None:
        pixels = torch.stack([s.pixels for s in batch]).to(device=device, dtype=dtype)
        logits = model(pixels)
        if segmentation:
            _score_segmentation(meter, logits, [s.target for s in batch], model.num_labels, num_classes)
        else:
            if logits.ndim != 2 or logits.shape != (len(batch), model.num_labels):
                raise ValueError(
                    f"expected logits ({len(batch)}, {model.num_labels}), got {tuple(logits.shape)}"
                )
            meter.update(logits.float().cpu(), torch.tensor([s.target for s in batch]))
        bar.update(len(batch))
        batch.clear()

    start = time.perf_counter()
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    prefetch = max(2 * batch_size, 2 * workers)
    stream = _stream(dataset, transform, range(len(dataset)), workers, prefetch)
    try:
        if module is not None:
            module.eval()
        with torch.inference_mode(), contextlib.closing(stream):
            for sample in stream:
                if sample.error is not None:
                    if not skip_bad:
                        raise sample.error
                    skipped.append(str(sample.error.path))
                    bar.update(1)
                    bar.set_postfix(skipped=len(skipped))
                    continue
                if batch and (len(batch) >= batch_size or sample.pixels.shape != batch[0].pixels.shape):
                    run_batch()
                batch.append(sample)
            if batch:
                run_batch()
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    seconds = time.perf_counter() - start

    if meter.n == 0:
        raise DynavitError(
            f"no image of {getattr(dataset, 'root', 'the dataset')} could be read ({len(skipped)} skipped)"
        )
    return EvalResult(
        metrics=meter.result(n_boot=n_boot, seed=seed),
        n_images=meter.n,
        n_skipped=len(skipped),
        skipped=skipped,
        seconds=seconds,
        images_per_s=meter.n / seconds if seconds > 0 else math.inf,
        task=dataset.task,
        dataset=dataset.describe() if hasattr(dataset, "describe") else None,
        transform=transform.to_dict() if hasattr(transform, "to_dict") else None,
        extra={"model": _model_name(model), "batch_size": batch_size, "n_boot": n_boot, "seed": seed},
    )


def _score_segmentation(
    meter: SegmentationMeter,
    logits: torch.Tensor,
    targets: list[np.ndarray],
    num_labels: int,
    num_classes: int,
) -> None:
    """Upsample each image's logits to its own label size, argmax over the dataset's classes, score."""
    if logits.ndim != 4 or logits.shape[:2] != (len(targets), num_labels):
        raise ValueError(f"expected logits ({len(targets)}, {num_labels}, h, w), got {tuple(logits.shape)}")
    for j, target in enumerate(targets):
        scores = logits[j : j + 1, :num_classes].float()
        if tuple(scores.shape[-2:]) != target.shape:
            scores = F.interpolate(scores, size=target.shape, mode="bilinear", align_corners=False)
        meter.update(scores.argmax(1)[0].cpu().numpy(), target)
