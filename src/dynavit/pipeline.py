"""The evaluation pipeline that ``dynavit eval`` and sweeps share: decode, batch, score.

Decoding and preprocessing run in a thread pool (PIL and torch release the GIL) while the
caller runs the model, so a CPU-bound decode does not leave the accelerator idle. Samples come
back in dataset order, so runs are deterministic whatever the number of workers. Images are
batched only while their transformed sizes agree.

``Scorer`` turns logits into the metrics and the per-image statistics: top-k correctness for
classification; for segmentation, logits upsampled bilinearly (align_corners=False) to each
label's own size before the argmax, so IoU is measured at the annotation's resolution. A
sweep scores exactly as ``evaluate`` does, so its rows and an evaluation's numbers agree.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynavit.data.metrics import ClassificationMeter, SegmentationMeter
from dynavit.errors import BadSampleError, DynavitError


@dataclass
class Sample:
    """One decoded image: its pixels and target, or the error that made it unusable."""

    index: int
    pixels: torch.Tensor | None
    target: Any
    error: BadSampleError | None = None


@dataclass
class Batch:
    """Images of one transformed size: pixels (B, 3, H, W) on the CPU and their targets.

    ``targets`` is a LongTensor of class indices (classification) or a list of (H, W) label
    arrays (segmentation), the forms ``Scorer.update`` takes.
    """

    pixels: torch.Tensor
    targets: Any

    def __len__(self) -> int:
        return len(self.pixels)


def torch_module(model: Any) -> nn.Module | None:
    """The nn.Module behind a model (itself, or a wrapper's ``module``), for device and eval mode."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else None


def placement(model: Any, module: nn.Module | None) -> tuple[torch.device, torch.dtype]:
    """Where inputs must go: the model's ``device`` attribute, else its first parameter's."""
    param = next(module.parameters(), None) if module is not None else None
    device = getattr(model, "device", None)
    if not isinstance(device, str | torch.device):
        device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.device(device), dtype


def model_name(model: Any) -> str:
    """How messages name a model: its source, else its type."""
    return str(getattr(model, "source", None) or type(model).__name__)


def dataset_name(dataset: Any) -> str:
    """How messages name a dataset: its root folder where it has one."""
    return str(getattr(dataset, "root", "the dataset"))


def check_compatible(model: Any, dataset: Any) -> None:
    """Refuse a model whose task or label count cannot score this dataset, before any decoding."""
    name, where = model_name(model), dataset_name(dataset)
    if dataset.task == "unlabelled":
        raise DynavitError(f"{where} has no labels (images without classes or masks); evaluation needs a "
                           "labelled dataset")
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


def decode(dataset: Any, transform: Callable[[Any], torch.Tensor], i: int) -> Sample:
    """Sample ``i`` transformed; a file that cannot be used becomes a Sample carrying its error."""
    try:
        img, target = dataset.load(i)
        return Sample(i, transform(img), target)
    except BadSampleError as err:
        return Sample(i, None, None, err)


def stream(
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    indices: Sequence[int],
    workers: int,
    prefetch: int,
) -> Iterator[Sample]:
    """Decoded samples in order, with up to ``prefetch`` decodes in flight on ``workers`` threads."""
    if workers <= 0:
        for i in indices:
            yield decode(dataset, transform, i)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="dynavit-decode") as pool:
        todo = iter(indices)
        pending: deque[Future[Sample]] = deque(
            pool.submit(decode, dataset, transform, i) for i in islice(todo, prefetch)
        )
        try:
            while pending:
                done = pending.popleft()
                for i in islice(todo, 1):
                    pending.append(pool.submit(decode, dataset, transform, i))
                yield done.result()
        finally:  # stopped early (error or abandoned): do not decode the rest
            for fut in pending:
                fut.cancel()


def _batch(samples: list[Sample], segmentation: bool) -> Batch:
    targets = [s.target for s in samples]
    return Batch(torch.stack([s.pixels for s in samples]), targets if segmentation else torch.tensor(targets))


def batches(
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int,
    skip_bad: bool,
    skipped: list[str],
    bar: tqdm | None = None,
    workers: int = 2,
) -> Iterator[Batch]:
    """The dataset's images in order, in batches of up to ``batch_size`` that share one size.

    A sample that cannot be decoded raises its ``BadSampleError``, unless ``skip_bad``: then
    its path is appended to ``skipped`` and ``bar`` (if any) counts it. The caller counts the
    images of each batch on ``bar`` once it has used them.
    """
    if batch_size < 1:  # checked here, not at the first ``next``, so a bad call fails before any work
        raise DynavitError(f"batch_size must be at least 1, got {batch_size}")
    return _batches(dataset, transform, batch_size, skip_bad, skipped, bar, workers)


def _batches(
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    skip_bad: bool,
    skipped: list[str],
    bar: tqdm | None,
    workers: int,
) -> Iterator[Batch]:
    segmentation = dataset.task == "segmentation"
    prefetch = max(2 * batch_size, 2 * workers)
    cur: list[Sample] = []
    with contextlib.closing(stream(dataset, transform, range(len(dataset)), workers, prefetch)) as samples:
        for sample in samples:
            if sample.error is not None:
                if not skip_bad:
                    raise sample.error
                skipped.append(str(sample.error.path))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(skipped=len(skipped))
                continue
            if cur and (len(cur) >= batch_size or sample.pixels.shape != cur[0].pixels.shape):
                yield _batch(cur, segmentation)
                cur = []
            cur.append(sample)
    if cur:
        yield _batch(cur, segmentation)


class Scorer:
    """Scores batches of logits into a task's metrics (with bootstrap CIs) and per-image statistics.

    Segmentation scores only the dataset's first ``num_classes`` logits (a model may predict more
    labels than the dataset defines).
    """

    def __init__(self, task: str, num_labels: int, num_classes: int, ignore_index: int = 255) -> None:
        self.task, self.num_labels, self.num_classes = task, int(num_labels), int(num_classes)
        self.segmentation = task == "segmentation"
        self.meter: ClassificationMeter | SegmentationMeter = (
            SegmentationMeter(num_classes, ignore_index) if self.segmentation else ClassificationMeter(num_labels)
        )

    @property
    def n(self) -> int:
        return self.meter.n

    def update(self, logits: torch.Tensor, targets: Any) -> None:
        """Score one batch: ``targets`` as ``Batch.targets`` holds them; logits on any device."""
        n = len(targets)
        if self.segmentation:
            self._update_segmentation(logits, targets)
            return
        if logits.ndim != 2 or logits.shape != (n, self.num_labels):
            raise ValueError(f"expected logits ({n}, {self.num_labels}), got {tuple(logits.shape)}")
        self.meter.update(logits.float().cpu(), targets)

    def _update_segmentation(self, logits: torch.Tensor, targets: list[np.ndarray]) -> None:
        """Upsample each image's logits to its own label size, argmax over the dataset's classes, score."""
        if logits.ndim != 4 or logits.shape[:2] != (len(targets), self.num_labels):
            raise ValueError(
                f"expected logits ({len(targets)}, {self.num_labels}, h, w), got {tuple(logits.shape)}"
            )
        for j, target in enumerate(targets):
            scores = logits[j : j + 1, : self.num_classes].float()
            if tuple(scores.shape[-2:]) != target.shape:
                scores = F.interpolate(scores, size=target.shape, mode="bilinear", align_corners=False)
            self.meter.update(scores.argmax(1)[0].cpu().numpy(), target)

    def result(self, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        """The metrics, each {"value", "ci_low", "ci_high"} (fractions), with a bootstrap over images."""
        return self.meter.result(n_boot=n_boot, seed=seed)

    def per_image(self) -> np.ndarray:
        """Per-image statistics for paired comparisons: (N, K) top-k hits as uint8, or (N, 3, C) IoU counts."""
        if isinstance(self.meter, SegmentationMeter):
            return self.meter.stats
        return self.meter.correct.astype(np.uint8)
