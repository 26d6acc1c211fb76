"""Metrics checked against confusion matrices and scores computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dynavit.data.metrics import (
    ClassificationMeter,
    SegmentationMeter,
    bootstrap_weights,
    classification_bootstrap,
    confusion_matrix,
    image_stats,
    percentile_ci,
    segmentation_bootstrap,
    segmentation_scores,
    topk_correct,
)
from dynavit.errors import DynavitError

# Image A, 3 classes; the 255 pixel is ignored even though something is predicted there.
TARGET_A = np.array([[0, 0, 1], [2, 255, 1]])
PRED_A = np.array([[0, 1, 1], [2, 0, 0]])
# labelled (gt, pred) pairs: (0,0) (0,1) (1,1) (2,2) (1,0)
CM_A = np.array(
    [
        [1, 1, 0],
        [1, 1, 0],
        [0, 0, 1],
    ]
)
# IoU0 = 1 / (1 + FP 1 + FN 1) = 1/3, IoU1 = 1/3, IoU2 = 1/1; mIoU = 5/9; pixel acc = 3/5

# Image B: every labelled pixel is class 2 and predicted right.
TARGET_B = np.full((2, 3), 2)
PRED_B = np.full((2, 3), 2)


def test_confusion_matrix_hand_example() -> None:
    cm = confusion_matrix(PRED_A, TARGET_A, num_classes=3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CM_A)


def test_scores_hand_example() -> None:
    s = segmentation_scores(CM_A)
    np.testing.assert_allclose(s["iou"], [1 / 3, 1 / 3, 1.0])
    assert s["miou"] == pytest.approx(5 / 9)
    assert s["pix_acc"] == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_excluded_and_predicted_only_class_is_zero() -> None:
    # 4 classes: class 2 only predicted (IoU 0), class 3 in neither (NaN, left out of the mean).
    target = np.array([[0, 0, 1], [1, 1, 255]])
    pred = np.array([[0, 2, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=4)
    np.testing.assert_array_equal(cm, [[1, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = segmentation_scores(cm)
    # IoU0 = 1/(1+1+1), IoU1 = 2/(2+0+1), IoU2 = 0/(0+1+0), IoU3 = 0/0
    np.testing.assert_allclose(s["iou"][:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["pix_acc"] == pytest.approx(3 / 5)
    assert s["mean_acc"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # classes without gt have no recall


def test_all_ignored_gives_nan_scores() -> None:
    cm = confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 255), num_classes=3)
    assert cm.sum() == 0
    s = segmentation_scores(cm)
    assert math.isnan(s["miou"]) and math.isnan(s["pix_acc"])


def test_confusion_matrix_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="pred value 3"):
        confusion_matrix(np.array([3, 0]), np.array([0, 0]), num_classes=3)
    with pytest.raises(ValueError, match="target value 7"):
        confusion_matrix(np.array([0, 0]), np.array([7, 0]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), num_classes=3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros(3), np.zeros(3, int), num_classes=3)
    # an out-of-range prediction on an ignored pixel does not matter
    assert confusion_matrix(np.array([9]), np.array([255]), num_classes=3).sum() == 0


def test_segmentation_meter_is_dataset_level_not_mean_of_images() -> None:
    meter = SegmentationMeter(num_classes=3)
    meter.update(torch.from_numpy(PRED_A), torch.from_numpy(TARGET_A))
    meter.update(PRED_B[None], TARGET_B[None])  # (N, H, W) form
    np.testing.assert_array_equal(meter.confusion, [[1, 1, 0], [1, 1, 0], [0, 0, 7]])
    r = meter.result(n_boot=0)
    # summed cm: IoU = 1/3, 1/3, 7/7 -> mIoU 5/9 (the mean of per-image mIoUs would be (5/9 + 1)/2)
    assert r["miou"]["value"] == pytest.approx(5 / 9)
    assert r["pix_acc"]["value"] == pytest.approx(9 / 11)
    assert r["per_class_iou"] == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert r["miou"]["ci_low"] is None and r["n"] == 2


def test_segmentation_meter_reports_nan_as_none() -> None:
    meter = SegmentationMeter(num_classes=4)
    meter.update(PRED_A, TARGET_A)
    r = meter.result(n_boot=20)
    assert r["per_class_iou"][3] is None
    assert r["per_class_iou"][:3] == pytest.approx([1 / 3, 1 / 3, 1.0])


def test_image_stats_are_diag_rows_cols() -> None:
    np.testing.assert_array_equal(image_stats(CM_A), [[1, 1, 1], [2, 2, 1], [2, 2, 1]])


def test_topk_hand_example() -> None:
    logits = np.array(
        [
            [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # target 1 is 2nd  -> top1 no,  top5 yes
            [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # target 3 is 1st  -> yes, yes
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 5 is 6th  -> no,  no
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tied, ranked as argmax does: target 2 is 3rd
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # target 0 is what argmax returns -> yes, yes
        ]
    )
    targets = np.array([1, 3, 5, 2, 0])
    expected = [[False, True], [True, True], [False, False], [False, True], [True, True]]
    np.testing.assert_array_equal(topk_correct(logits, targets, ks=(1, 5)), expected)
    np.testing.assert_array_equal(topk_correct(torch.tensor(logits), torch.tensor(targets)), expected)


def test_top1_matches_argmax_and_k_is_clipped() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=50)
    c = topk_correct(logits, targets, ks=(1, 7, 10))
    np.testing.assert_array_equal(c[:, 0], logits.argmax(1) == targets)
    assert c[:, 1].all() and c[:, 2].all()


def test_classification_meter_hand_example() -> None:
    meter = ClassificationMeter(num_classes=6)
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]] * 2 + [[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    meter.update(logits[:2], torch.tensor([1, 3]))
    meter.update(logits[2:], torch.tensor([5]))
    r = meter.result(n_boot=0)
    assert r["top1"]["value"] == pytest.approx(1 / 3)
    assert r["top5"]["value"] == pytest.approx(2 / 3)
    assert r["n"] == 3
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        meter.update(torch.zeros(2, 5), torch.tensor([0, 1]))


def test_empty_meters_raise_user_errors() -> None:
    with pytest.raises(DynavitError):
        ClassificationMeter(10).result()
    with pytest.raises(DynavitError):
        SegmentationMeter(3).result()


# ----------------------------------------------------------------------------- bootstrap


def _accuracy_meter(n: int, rate: float) -> ClassificationMeter:
    meter = ClassificationMeter(num_classes=2, ks=(1,))
    correct = np.arange(n) < round(rate * n)
    targets = np.where(correct, 0, 1)
    meter.update(np.tile([1.0, 0.0], (n, 1)), targets)  # always predicts class 0
    return meter


def test_classification_ci_contains_estimate_narrows_and_is_seeded() -> None:
    small = _accuracy_meter(100, 0.7).result(n_boot=500, seed=0)["top1"]
    big = _accuracy_meter(2000, 0.7).result(n_boot=500, seed=0)["top1"]
    for r in (small, big):
        assert r["value"] == pytest.approx(0.7)
        assert r["ci_low"] < r["value"] < r["ci_high"]
    assert big["ci_high"] - big["ci_low"] < 0.5 * (small["ci_high"] - small["ci_low"])
    assert _accuracy_meter(100, 0.7).result(n_boot=500, seed=0)["top1"] == small
    assert _accuracy_meter(100, 0.7).result(n_boot=500, seed=1)["top1"] != small


def test_bootstrap_weights_are_resamples_of_n() -> None:
    w = bootstrap_weights(7, n_boot=40, seed=3)
    assert w.shape == (40, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, bootstrap_weights(7, n_boot=40, seed=3))


def _random_images(n: int, c: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        target = rng.integers(0, c, size=(4, 5))
        target[rng.random((4, 5)) < 0.2] = 255
        pred = np.where(
            rng.random((4, 5)) < 0.6, np.where(target == 255, 0, target), rng.integers(0, c, (4, 5))
        )
        out.append((pred, target))
    return out


def test_vectorised_segmentation_bootstrap_equals_slow_loop() -> None:
    c, n_boot, seed = 4, 60, 5
    images = _random_images(6, c, seed=1)
    cms = np.stack([confusion_matrix(p, t, c) for p, t in images])
    stats = np.stack([image_stats(cm) for cm in cms])
    fast = segmentation_bootstrap(stats, n_boot=n_boot, seed=seed)
    for b, w in enumerate(bootstrap_weights(len(images), n_boot, seed)):
        drawn = np.repeat(np.arange(len(images)), w)  # the images of replicate b, with repeats
        slow = segmentation_scores(cms[drawn].sum(0))
        assert fast["miou"][b] == pytest.approx(slow["miou"], nan_ok=True)
        assert fast["pix_acc"][b] == pytest.approx(slow["pix_acc"], nan_ok=True)


def test_vectorised_classification_bootstrap_equals_slow_loop() -> None:
    correct = np.random.default_rng(0).random((9, 2)) < 0.6
    fast = classification_bootstrap(correct, n_boot=30, seed=2)
    for b, w in enumerate(bootstrap_weights(9, 30, 2)):
        np.testing.assert_allclose(fast[b], correct[np.repeat(np.arange(9), w)].mean(0))


def test_segmentation_meter_ci() -> None:
    def meter_for(n: int) -> SegmentationMeter:
        meter = SegmentationMeter(num_classes=3)
        for p, t in _random_images(n, 3, seed=7):
            meter.update(p, t)
        return meter

    small, big = meter_for(20).result(n_boot=400), meter_for(400).result(n_boot=400)
    for r in (small, big):
        for key in ("miou", "pix_acc"):
            assert r[key]["ci_low"] <= r[key]["value"] <= r[key]["ci_high"]
    width = {name: r["miou"]["ci_high"] - r["miou"]["ci_low"] for name, r in (("s", small), ("b", big))}
    assert width["b"] < 0.5 * width["s"]
    assert meter_for(20).result(n_boot=400) == small


def test_percentile_ci() -> None:
    samples = np.arange(1001, dtype=float)
    assert percentile_ci(samples) == pytest.approx((25.0, 975.0))
    assert all(math.isnan(v) for v in percentile_ci(np.full(5, np.nan)))
