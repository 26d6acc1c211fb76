"""evaluate() with tiny fake models whose outputs are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dynavit.data import ClassificationTransform, SegmentationTransform, open_dataset
from dynavit.data.metrics import confusion_matrix, segmentation_scores
from dynavit.errors import BadSampleError, DynavitError
from dynavit.evaluation import evaluate

NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
STEP = 20  # a pixel's red value is STEP * class


class FakeClassifier(nn.Module):
    """Predicts the class encoded in the image's red channel; logits fall off with class distance.

    So the top-5 of class c is c, c-1, c+1, c-2, c+2 (ties broken by a tiny index term).
    """

    task = "classification"

    def __init__(self, num_labels: int = 10) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.transform = ClassificationTransform(crop=8, resize=8, **NO_NORM)
        self.weight = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.batch_sizes: list[int] = []
        self.seen_modes: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(x))
        self.seen_modes.append((self.training, torch.is_inference_mode_enabled()))
        cls = (x[:, 0].mean((1, 2)) * 255 / STEP).round()
        k = torch.arange(self.num_labels, dtype=torch.float32)
        return -(k[None] - cls[:, None]).abs() - 0.01 * k[None] + self.weight


def make_class_folders(root: Path, wrong: dict[tuple[int, int], int] | None = None) -> Path:
    """10 classes x 2 PNG images; ``wrong[(class, k)] = c`` paints that image as class c."""
    wrong = wrong or {}
    for c in range(10):
        for k in range(2):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            shown = wrong.get((c, k), c)
            Image.new("RGB", (10, 12), (STEP * shown, 0, 0)).save(root / f"c{c}" / f"{k}.png")
    return root


@pytest.fixture
def cls_root(tmp_path: Path) -> Path:
    # (3, 0) shown as 5: top-1 wrong, top-5 right; (0, 1) shown as 9: both wrong
    return make_class_folders(tmp_path / "cf", wrong={(3, 0): 5, (0, 1): 9})


def test_classification_counts_exact(cls_root: Path) -> None:
    model = FakeClassifier()
    model.train()
    r = evaluate(model, open_dataset(cls_root), batch_size=3, progress=False, n_boot=200)
    assert r.n_images == 20 and r.n_skipped == 0 and r.task == "classification"
    assert r.metrics["top1"]["value"] == pytest.approx(18 / 20)
    assert r.metrics["top5"]["value"] == pytest.approx(19 / 20)
    assert r.metrics["top1"]["ci_low"] <= 0.9 <= r.metrics["top1"]["ci_high"]
    assert max(model.batch_sizes) == 3 and sum(model.batch_sizes) == 20
    assert set(model.seen_modes) == {(False, True)}  # eval mode, under inference_mode
    assert model.training  # restored afterwards
    assert r.images_per_s > 0 and r.seconds > 0
    assert json.loads(json.dumps(r.to_json()))["metrics"]["n"] == 20


def test_results_do_not_depend_on_workers_or_batching(cls_root: Path) -> None:
    ds = open_dataset(cls_root)
    a = evaluate(FakeClassifier(), ds, batch_size=32, workers=0, progress=False, n_boot=100)
    b = evaluate(FakeClassifier(), ds, batch_size=1, workers=4, progress=True, n_boot=100)
    assert a.metrics == b.metrics


def test_limit(cls_root: Path) -> None:
    r = evaluate(FakeClassifier(), open_dataset(cls_root), limit=5, progress=False, n_boot=0)
    assert r.n_images == 5 and r.metrics["top1"]["ci_low"] is None


def test_bad_file_raises_or_is_skipped(cls_root: Path) -> None:
    bad = cls_root / "c4" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = open_dataset(cls_root)
    with pytest.raises(BadSampleError, match=r"c4/broken\.png"):
        evaluate(FakeClassifier(), ds, progress=False, n_boot=0)
    r = evaluate(FakeClassifier(), ds, skip_bad=True, progress=False, n_boot=0)
    assert r.n_images == 20 and r.n_skipped == 1 and r.skipped == [str(bad)]
    assert r.metrics["top1"]["value"] == pytest.approx(18 / 20)


def test_all_bad_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "cf" / "a").mkdir(parents=True)
    (tmp_path / "cf" / "a" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DynavitError, match="could be read"):
        evaluate(FakeClassifier(1), open_dataset(tmp_path / "cf"), skip_bad=True, progress=False)


def test_incompatible_model_and_dataset(cls_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DynavitError, match="10 classes but .* predicts only 5 labels"):
        evaluate(FakeClassifier(5), open_dataset(cls_root), progress=False)
    seg = make_camvid(tmp_path / "camvid", [np.zeros((2, 2), np.uint8)])
    with pytest.raises(DynavitError, match="is a classification model but .* is a segmentation dataset"):
        evaluate(FakeClassifier(11), open_dataset(seg), progress=False)


# ----------------------------------------------------------------------------- segmentation


class FakeSegmenter(nn.Module):
    """Logits at half resolution: a one-hot of the class in the red channel (``exact``), or a fixed
    random linear map of 2x2-pooled pixels (``random``) whose upsampling the test repeats by hand."""

    task = "segmentation"

    def __init__(
        self, num_labels: int = 11, mode: str = "exact", size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.num_labels, self.mode = num_labels, mode
        self.transform = SegmentationTransform(size=size, **NO_NORM)
        self.proj = nn.Parameter(torch.randn(num_labels, 3, generator=torch.Generator().manual_seed(0)))
        self.input_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_shapes.append(tuple(x.shape))
        if self.mode == "exact":
            cls = (x[:, 0, ::2, ::2] * 255 / STEP).round().long().clamp(0, self.num_labels - 1)
            return F.one_hot(cls, self.num_labels).permute(0, 3, 1, 2).float()
        return torch.einsum("kc,bchw->bkhw", self.proj, F.avg_pool2d(x, 2))


def make_camvid(root: Path, labels: list[np.ndarray]) -> Path:
    """CamVid split folder; the image's red channel encodes the label (void pixels show class 0)."""
    for k, lab in enumerate(labels):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        red = np.where(lab == 11, 0, lab) * STEP
        rgb = np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{k:03d}.png")
        Image.fromarray(lab.astype(np.uint8), mode="L").save(root / "labels" / f"{k:03d}.png")
    return root


def block_labels(h: int, w: int, seed: int) -> np.ndarray:
    """Labels constant on 2x2 blocks (what a half-resolution model can get exactly right), some void."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 12, size=(h // 2, w // 2))
    return np.kron(blocks, np.ones((2, 2), dtype=np.int64))


def test_segmentation_upsamples_to_label_size_and_mixes_sizes(tmp_path: Path) -> None:
    labels = [block_labels(8, 12, 0), block_labels(8, 12, 1), block_labels(6, 10, 2), block_labels(8, 12, 3)]
    ds = open_dataset(make_camvid(tmp_path / "camvid", labels))
    model = FakeSegmenter()
    r = evaluate(model, ds, batch_size=8, progress=False, n_boot=50)
    # half-resolution one-hot logits, bilinearly upsampled: each pixel's nearest source dominates
    assert r.metrics["miou"]["value"] == 1.0 and r.metrics["pix_acc"]["value"] == 1.0
    assert r.n_images == 4
    # batched while sizes agree: [img0, img1], [img2], [img3]
    assert model.input_shapes == [(2, 3, 8, 12), (1, 3, 6, 10), (1, 3, 8, 12)]
    present = {int(v) for lab in labels for v in np.unique(lab) if v != 11}
    assert [i for i, v in enumerate(r.metrics["per_class_iou"]) if v is not None] == sorted(present)


def test_segmentation_matches_manual_upsampling(tmp_path: Path) -> None:
    labels = [block_labels(8, 12, s) for s in range(3)]
    ds = open_dataset(make_camvid(tmp_path / "camvid", labels))
    model = FakeSegmenter(mode="random", size=(4, 6))  # the model sees half-size images
    r = evaluate(model, ds, batch_size=2, progress=False, n_boot=0)
    assert {s[-2:] for s in model.input_shapes} == {(4, 6)}
    cm = np.zeros((11, 11), np.int64)
    with torch.no_grad():
        for i in range(len(ds)):
            img, target = ds.load(i)
            logits = model(model.transform(img)[None])  # (1, 11, 2, 3)
            up = F.interpolate(logits, size=target.shape, mode="bilinear", align_corners=False)
            cm += confusion_matrix(up.argmax(1)[0].numpy(), target, 11)
    assert r.metrics["miou"]["value"] == pytest.approx(segmentation_scores(cm)["miou"])
    assert r.metrics["pix_acc"]["value"] == pytest.approx(segmentation_scores(cm)["pix_acc"])


def test_segmentation_extra_model_labels_are_not_scored(tmp_path: Path) -> None:
    ds = open_dataset(make_camvid(tmp_path / "camvid", [block_labels(4, 4, 0)]))
    with pytest.warns(UserWarning, match="only the first 11"):
        r = evaluate(FakeSegmenter(num_labels=12), ds, progress=False, n_boot=0)
    assert r.metrics["miou"]["value"] == 1.0
