"""The main quality metric of a sweep and its paired comparisons, from per-image statistics.

Every row keeps per-image statistics (top-1/top-5 hits, or per-class intersection / ground
truth / prediction counts), so any two configs can be compared *paired*: both resampled with
the same bootstrap weights over the same images. A paired interval is much tighter than two
overlapping marginal intervals, because most images are right (or wrong) under both configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def task_of(per_images: Sequence[np.ndarray | None]) -> str | None:
    """The task the per-image statistics belong to, from their shape: classification rows hold (n, 2)
    hits, segmentation rows (n, 3, C) pixel counts. None when no row carries them.

    Taking the task from the data means no caller can pair segmentation rows as classification hits.
    """
    shapes = {np.ndim(p) for p in per_images if p is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"rows of different tasks (per-image statistics of {len(shapes)} ranks) cannot be compared")
    return "segmentation" if shapes.pop() == 3 else "classification"


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials.

    A bootstrap of 5 hits in 5 gives [1, 1], and a normal interval around 3/400 dips below 0;
    the exact interval keeps its coverage at any n, which is what a claim about a 1 % miss rate
    over a few hundred frames needs. Found by bisection on the binomial tail (no scipy).
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1 - level
    ks = np.arange(n + 1)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in ks])

    def solve(f: Callable[[float], float], target: float) -> float:  # f rises with p
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: _upper_tail_from(logc, ks, n, k, p), alpha / 2)
    # P(X <= k | p) = 1 - P(X >= k + 1 | p) falls with p; solve P(X >= k + 1) = 1 - alpha / 2
    upper = 1.0 if k == n else solve(lambda p: _upper_tail_from(logc, ks, n, k + 1, p), 1 - alpha / 2)
    return lower, upper


def _upper_tail_from(logc: np.ndarray, ks: np.ndarray, n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), from the log binomial coefficients ``logc``."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    return float(np.exp(logc[k:] + ks[k:] * math.log(p) + (n - ks[k:]) * math.log1p(-p)).sum())


def split_images(n: int, seed: int = 0, share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, sorted index sets over ``n`` images (``share`` of them first), seeded.

    One set chooses (a menu's qualities, the best config under a constraint), the other scores
    what was chosen: a choice scored on the images that made it is biased upwards.
    """
    if n < 2 or not 0 < share < 1:
        raise ValueError(f"a split needs at least 2 images and 0 < share < 1, got n={n}, share={share}")
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(int(round(share * n)), 1), n - 1)
    return np.sort(order[:k]), np.sort(order[k:])


def interval(per_image: np.ndarray, task: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the main metric: exact binomial for top-1 (a proportion), bootstrap for mIoU."""
    if task == "segmentation":
        return percentile_ci(replicates(per_image, task, n_boot, seed))
    hits = np.asarray(per_image)[:, 0]
    return clopper_pearson(int(hits.sum()), len(hits))
