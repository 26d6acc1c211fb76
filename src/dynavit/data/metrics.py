"""Exact accuracy / IoU metrics with image-level bootstrap confidence intervals (numpy only).

Conventions (those of mmsegmentation and timm, so numbers are comparable):

* Confusion matrices have rows = ground truth and columns = prediction; pixels whose target
  is ``ignore_index`` are left out entirely (they are neither FN nor FP).
* IoU_c = TP / (TP + FP + FN). A class with zero union (in neither the ground truth nor the
  prediction) has IoU NaN and is left out of the mean; a class that is only predicted has IoU 0.
* mIoU and pixel accuracy are *dataset-level*: computed from counts summed over all images,
  not averaged over per-image scores.
* Confidence intervals are percentile bootstraps that resample *images* (the unit that was
  sampled), with a fixed seed so reports are reproducible. For segmentation each image keeps
  its sufficient statistics (per class: intersection, gt count, pred count), and a resample is
  a weight vector of multiplicities, so every replicate's dataset-level score is recomputed
  from ``weights @ stats`` in one matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from dynavit.errors import DynavitError

_BOOT_CHUNK_ELEMENTS = 4_000_000  # weights generated and used per chunk, bounding memory for big sets


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_int(x: Any, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{what} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _num(x: float) -> float | None:
    """Python float for JSON; NaN (undefined) becomes None."""
    x = float(x)
    return None if math.isnan(x) else x


# ----------------------------------------------------------------------------- segmentation


def _labelled_pairs(
    pred: Any, target: Any, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (pred, target) of labelled pixels, validated to lie in [0, num_classes)."""
    p, t = _as_int(pred, "pred"), _as_int(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    for arr, what in ((t, "target"), (p, "pred")):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            bad = arr[(arr < 0) | (arr >= num_classes)][0]
            raise ValueError(f"{what} value {bad} is outside [0, {num_classes}) and is not ignore_index")
    return p, t


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 counts; rows = ground truth, columns = prediction; ignored pixels excluded."""
    p, t = _labelled_pairs(pred, target, num_classes, ignore_index)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _scores_from_sums(inter: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """IoU/mIoU/pixel-acc/mean-acc from per-class sums with shape (..., C); NaN where undefined.

    Written without nanmean so that all-NaN replicates give NaN silently, and so that it works
    on a whole batch of bootstrap replicates at once.
    """
    inter, gt, pred = (np.asarray(a, dtype=np.float64) for a in (inter, gt, pred))
    union = gt + pred - inter
    has_union, has_gt = union > 0, gt > 0
    iou = np.where(has_union, inter / np.where(has_union, union, 1.0), np.nan)
    acc = np.where(has_gt, inter / np.where(has_gt, gt, 1.0), np.nan)

    def nanmean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        count = mask.sum(-1)
        total = np.where(mask, values, 0.0).sum(-1)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    labelled = gt.sum(-1)
    pix_acc = np.where(labelled > 0, inter.sum(-1) / np.maximum(labelled, 1), np.nan)
    return {
        "iou": iou,
        "miou": nanmean(iou, has_union),
        "mean_acc": nanmean(acc, has_gt),
        "pix_acc": pix_acc,
    }


def segmentation_scores(cm: np.ndarray) -> dict[str, Any]:
    """Scores of a (C, C) confusion matrix.

    Returns ``iou`` (C,) with NaN for classes absent from both gt and prediction, ``miou``
    (mean over non-NaN classes), ``pix_acc`` = trace / sum and ``mean_acc`` (mean per-class recall).
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    s = _scores_from_sums(np.diag(cm), cm.sum(1), cm.sum(0))
    return {"iou": s["iou"], "miou": float(s["miou"]), "pix_acc": float(s["pix_acc"]),
            "mean_acc": float(s["mean_acc"])}  # fmt: skip


def image_stats(cm: np.ndarray) -> np.ndarray:
    """Per-image sufficient statistics (3, C): intersection (diag), gt count (row sum), pred count (col sum).

    Correct and labelled pixel counts are the sums of the first two rows, so they need no
    separate storage; these three vectors add up exactly over images, which is what lets the
    bootstrap recompute dataset-level scores from weighted sums.
    """
    return np.stack([np.diag(cm), cm.sum(1), cm.sum(0)]).astype(np.int64)


def stats_miou(stats: np.ndarray) -> float:
    """Dataset-level mIoU from (N, 3, C) per-image statistics (the sum over images)."""
    return float(_scores_from_sums(*np.asarray(stats).sum(0))["miou"])


# ----------------------------------------------------------------------------- classification


def topk_correct(logits: Any, targets: Any, ks: Sequence[int] = (1, 5)) -> np.ndarray:
    """(N, len(ks)) bool: is the target among the k highest logits.

    Ties are broken as ``argmax`` does (lower class index first), so a constant model is not
    credited with every class; k larger than the number of classes is clipped (always correct).
    """
    x = _to_numpy(logits).astype(np.float64, copy=False)
    t = _as_int(targets, "targets").reshape(-1)
    if x.ndim != 2 or x.shape[0] != t.shape[0]:
        raise ValueError(f"logits must be (N, C) with N = len(targets); got {x.shape} and {t.shape}")
    n, c = x.shape
    if t.size and (t.min() < 0 or t.max() >= c):
        raise ValueError(f"targets must lie in [0, {c}), got values from {t.min()} to {t.max()}")
    target_logit = x[np.arange(n), t][:, None]
    earlier = np.arange(c)[None, :] < t[:, None]
    rank = (x > target_logit).sum(1) + ((x == target_logit) & earlier).sum(1)
    return rank[:, None] < np.asarray(ks, dtype=np.int64)[None, :]


# ----------------------------------------------------------------------------- bootstrap


def iter_bootstrap_weights(n: int, n_boot: int = 1000, seed: int = 0) -> Iterator[np.ndarray]:
    """Chunks of resampling weights: row b counts how often each of the n images is drawn.

    One multinomial draw of n out of n per replicate (= sampling images with replacement).
    Chunked so large sets do not need an (n_boot, n) matrix in memory; the chunk size depends
    only on n, so the weights for a given (n, n_boot, seed) are always the same.
    """
    if n <= 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    p = np.full(n, 1.0 / n)
    for start in range(0, n_boot, chunk):
        yield rng.multinomial(n, p, size=min(chunk, n_boot - start))


def bootstrap_weights(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """All (n_boot, n) weights at once (for tests and small sets)."""
    return np.concatenate(list(iter_bootstrap_weights(n, n_boot, seed)))


def bootstrap(
    stats: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """Replicates ``statistic(weights @ stats)`` (n_boot, ...) from (N, D) per-image additive statistics."""
    flat = np.asarray(stats, dtype=np.float64).reshape(len(stats), -1)
    return np.concatenate([statistic(w @ flat) for w in iter_bootstrap_weights(len(flat), n_boot, seed)])


def percentile_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval along axis 0 (NaN replicates, from degenerate resamples, are dropped)."""
    tail = 50.0 * (1.0 - confidence)
    if np.all(np.isnan(samples)):
        return math.nan, math.nan
    low, high = np.nanpercentile(samples, [tail, 100.0 - tail], axis=0)
    return float(low), float(high)


def _estimate(value: float, samples: np.ndarray | None, confidence: float) -> dict[str, float | None]:
    low, high = (math.nan, math.nan) if samples is None else percentile_ci(samples, confidence)
    return {"value": _num(value), "ci_low": _num(low), "ci_high": _num(high)}


def classification_bootstrap(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, K) accuracies of resampled sets from per-image correctness (N, K)."""
    n = len(correct)
    return bootstrap(np.asarray(correct, dtype=np.float64), lambda s: s / n, n_boot, seed)


def segmentation_bootstrap(stats: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Replicates (n_boot,) of dataset-level ``miou``, ``pix_acc`` and ``mean_acc`` from (N, 3, C) stats."""
    stats = np.asarray(stats)
    c = stats.shape[-1]
    keys = ("miou", "pix_acc", "mean_acc")

    def scores(sums: np.ndarray) -> np.ndarray:
        s = _scores_from_sums(*np.moveaxis(sums.reshape(-1, 3, c), 1, 0))
        return np.stack([s[k] for k in keys], axis=1)

    reps = bootstrap(stats, scores, n_boot, seed)
    return {k: reps[:, j] for j, k in enumerate(keys)}


# ----------------------------------------------------------------------------- meters


class ClassificationMeter:
    """Accumulates per-image top-k correctness; ``result`` gives accuracies (fractions) with CIs."""

    def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5)) -> None:
        self.num_classes = int(num_classes)
        self.ks = tuple(int(k) for k in ks)
        self._correct: list[np.ndarray] = []

    def update(self, logits: Any, targets: Any) -> None:
        shape = tuple(logits.shape)
        if len(shape) != 2 or shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (N, {self.num_classes}), got {shape}")
        self._correct.append(topk_correct(logits, targets, self.ks))

    @property
    def n(self) -> int:
        return sum(len(c) for c in self._correct)

    @property
    def correct(self) -> np.ndarray:
        """(N, len(ks)) bool, one row per image in update order."""
        return np.concatenate(self._correct) if self._correct else np.zeros((0, len(self.ks)), bool)

    def result(self, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
        """``{"top1": {"value", "ci_low", "ci_high"}, "top5": ..., "n"}``; no CI when n_boot=0."""
        if self.n == 0:
            raise DynavitError("no images were scored, so there is no accuracy to report")
        correct = self.correct
        reps = classification_bootstrap(correct, n_boot, seed) if n_boot > 0 else None
        out: dict[str, Any] = {
            f"top{k}": _estimate(correct[:, j].mean(), None if reps is None else reps[:, j], confidence)
            for j, k in enumerate(self.ks)
        }
        out["n"] = self.n
        return out


class SegmentationMeter:
    """Accumulates the dataset confusion matrix plus per-image statistics for the bootstrap."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._stats: list[np.ndarray] = []

    def update(self, pred: Any, target: Any) -> None:
        """``pred``/``target``: (H, W) for one image or (N, H, W) for N images (class indices)."""
        p, t = _as_int(pred, "pred"), _as_int(target, "target")
        if p.shape != t.shape or p.ndim not in (2, 3):
            raise ValueError(f"pred and target must both be (H, W) or (N, H, W); got {p.shape} and {t.shape}")
        for pi, ti in zip(p.reshape(-1, *p.shape[-2:]), t.reshape(-1, *t.shape[-2:]), strict=True):
            cm = confusion_matrix(pi, ti, self.num_classes, self.ignore_index)
            self.confusion += cm
            self._stats.append(image_stats(cm))

    @property
    def n(self) -> int:
        return len(self._stats)

    @property
    def stats(self) -> np.ndarray:
        """(N, 3, C) per-image intersection / gt count / pred count."""
        return np.stack(self._stats) if self._stats else np.zeros((0, 3, self.num_classes), np.int64)

    def result(self, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
        """``miou``/``pix_acc``/``mean_acc`` as {"value", "ci_low", "ci_high"}, ``per_class_iou``, ``n``."""
        if self.n == 0:
            raise DynavitError("no images were scored, so there is no IoU to report")
        scores = segmentation_scores(self.confusion)
        reps = segmentation_bootstrap(self.stats, n_boot, seed) if n_boot > 0 else {}
        out: dict[str, Any] = {
            k: _estimate(scores[k], reps.get(k), confidence) for k in ("miou", "pix_acc", "mean_acc")
        }
        out["per_class_iou"] = [_num(v) for v in scores["iou"]]
        out["n"] = self.n
        return out
