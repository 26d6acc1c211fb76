"""The shared evaluation pipeline: batching, decoding, scoring; evaluate and the sweep agree exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynavit import load
from dynavit.config import ExecConfig
from dynavit.data import open_dataset
from dynavit.data.metrics import confusion_matrix, image_stats, topk_correct
from dynavit.errors import BadSampleError, DynavitError
from dynavit.evaluation import evaluate
from dynavit.pipeline import Scorer, batches
from dynavit.sweep.engine import Evaluator, cache_dataset


class Sizes:
    """In-memory images: image i is (3, h, w) filled with i; ``bad`` indices fail to decode."""

    task = "classification"
    num_classes = 10

    def __init__(self, sizes: list[tuple[int, int]], bad: tuple[int, ...] = ()) -> None:
        self.sizes, self.bad = sizes, bad

    def __len__(self) -> int:
        return len(self.sizes)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        if i in self.bad:
            raise BadSampleError(Path(f"img{i}.png"), "not a readable image")
        return torch.full((3, *self.sizes[i]), float(i)), i % self.num_classes


SIZES = [(4, 4)] * 3 + [(4, 6)] * 2 + [(4, 4)] * 4


@pytest.mark.parametrize("workers", [0, 3])
def test_batches_keep_order_and_split_where_the_size_changes(workers: int) -> None:
    got = list(batches(Sizes(SIZES), lambda x: x, batch_size=2, skip_bad=False, skipped=[], workers=workers))
    assert [len(b) for b in got] == [2, 1, 2, 2, 2]
    assert [int(v) for b in got for v in b.pixels[:, 0, 0, 0]] == list(range(9))
    assert all(b.targets.dtype == torch.int64 for b in got)
    assert [t for b in got for t in b.targets.tolist()] == [i % 10 for i in range(9)]


def test_bad_samples_raise_or_are_listed() -> None:
    data = Sizes(SIZES, bad=(1, 5))
    with pytest.raises(BadSampleError, match="img1.png"):
        list(batches(data, lambda x: x, batch_size=4, skip_bad=False, skipped=[]))
    skipped: list[str] = []
    got = list(batches(data, lambda x: x, batch_size=4, skip_bad=True, skipped=skipped))
    assert skipped == ["img1.png", "img5.png"]
    assert [int(v) for b in got for v in b.pixels[:, 0, 0, 0]] == [0, 2, 3, 4, 6, 7, 8]
    with pytest.raises(DynavitError, match="batch_size"):
        batches(data, lambda x: x, batch_size=0, skip_bad=False, skipped=[])  # refused before any decode


def test_classification_scorer_counts_topk_per_image() -> None:
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    scorer = Scorer("classification", 7, 7)
    scorer.update(logits[:4], targets[:4])
    scorer.update(logits[4:], targets[4:])
    expected = topk_correct(logits, targets, (1, 5))
    assert scorer.n == 6 and scorer.per_image().dtype == np.uint8
    assert np.array_equal(scorer.per_image(), expected.astype(np.uint8))
    assert scorer.result(n_boot=0)["top1"]["value"] == pytest.approx(expected[:, 0].mean())
    with pytest.raises(ValueError, match=r"expected logits \(2, 7\)"):
        scorer.update(logits[:2, :6], targets[:2])


def test_segmentation_scorer_upsamples_to_each_label_and_scores_only_the_datasets_classes() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 3, 4, generator=gen)  # 5 labels, the dataset defines 3
    targets = [np.random.default_rng(0).integers(0, 3, (6, 8)), np.random.default_rng(1).integers(0, 3, (3, 4))]
    targets[0][0, :3] = 255  # void pixels are not scored
    scorer = Scorer("segmentation", 5, 3, 255)
    scorer.update(logits, targets)
    up = F.interpolate(logits[:1, :3], size=(6, 8), mode="bilinear", align_corners=False).argmax(1)[0]
    same_size = logits[1, :3].argmax(0)  # the second label has the logits' size: nothing to upsample
    cms = [confusion_matrix(up.numpy(), targets[0], 3), confusion_matrix(same_size.numpy(), targets[1], 3)]
    assert np.array_equal(scorer.per_image(), np.stack([image_stats(cm) for cm in cms]))
    assert scorer.per_image().shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"expected logits \(2, 5, h, w\)"):
        scorer.update(logits[:, :4], targets)


def _agree(dm, dataset, batch_size: int) -> None:
    r = evaluate(dm, dataset, batch_size=batch_size, n_boot=100, progress=False)
    data = cache_dataset(dm, dataset, batch_size=batch_size, progress=False)
    row = Evaluator(dm, data, measure_latency=False, n_boot=100).measure(ExecConfig())
    assert row.metrics == r.metrics  # the same numbers, CIs included, bit for bit
    assert data.n == r.n_images


def test_evaluate_and_the_sweep_score_classification_alike(deit_tiny, assets) -> None:
    _agree(deit_tiny, open_dataset(assets / "imagenet-samples", limit=12), batch_size=5)


def test_evaluate_and_the_sweep_score_segmentation_alike(assets, segformer_camvid) -> None:
    _agree(load(segformer_camvid), open_dataset(assets / "camvid" / "val", limit=4), batch_size=3)
