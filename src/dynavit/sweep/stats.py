"""The main quality metric of a sweep and its paired comparisons, from per-image statistics.

Every row keeps per-image statistics (top-1/top-5 hits, or per-class intersection / ground
truth / prediction counts), so any two configs can be compared *paired*: both resampled with
the same bootstrap weights over the same images. A paired interval is much tighter than two
overlapping marginal intervals, because most images are right (or wrong) under both configs.
"""

from __future__ import annotations

import numpy as np

from dynavit.data.metrics import classification_bootstrap, percentile_ci, segmentation_bootstrap, stats_miou


def main_metric(task: str) -> str:
    return "miou" if task == "segmentation" else "top1"


def point(per_image: np.ndarray, task: str) -> float:
    """The dataset-level main metric (top-1 or mIoU) in [0, 1]."""
    return float(replicates(per_image, task, n_boot=0))


def replicates(per_image: np.ndarray, task: str, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the main metric; with n_boot=0 the point value.

    The weights depend only on (n images, n_boot, seed), so replicates of two configs on the
    same images are paired.
    """
    if task == "segmentation":
        if n_boot == 0:
            return np.float64(stats_miou(per_image))
        return segmentation_bootstrap(per_image, n_boot, seed)["miou"]
    hits = np.asarray(per_image)[:, :1].astype(np.float64)
    if n_boot == 0:
        return hits.mean()
    return classification_bootstrap(hits, n_boot, seed)[:, 0]


def replicates_many(per_images: list[np.ndarray], task: str, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(rows, n_boot) paired replicates of many configs, drawing the bootstrap weights once."""
    n = len(per_images[0])
    if any(len(p) != n for p in per_images):
        raise ValueError("paired replicates need every config scored on the same images")
    if task == "segmentation":
        return np.stack([replicates(p, task, n_boot, seed) for p in per_images])
    hits = np.stack([np.asarray(p)[:, 0] for p in per_images], axis=1).astype(np.float64)  # (n, rows)
    return classification_bootstrap(hits, n_boot, seed).T


def paired_delta(a: np.ndarray, b: np.ndarray, task: str, n_boot: int = 1000, seed: int = 0,
                 ) -> tuple[float, float, float]:
    """metric(a) - metric(b) with its paired 95% bootstrap CI."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same images ({len(a)} vs {len(b)})")
    diff = replicates(a, task, n_boot, seed) - replicates(b, task, n_boot, seed)
    lo, hi = percentile_ci(diff)
    return point(a, task) - point(b, task), lo, hi
