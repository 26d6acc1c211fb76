"""Dataset layouts (synthetic folders for every layout, plus the real assets) and transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynavit.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYOUTS,
    ClassificationTransform,
    SegmentationTransform,
    detect_layout,
    open_dataset,
)
from dynavit.data.transforms import resize_shorter_side
from dynavit.errors import BadSampleError, DynavitError

# ----------------------------------------------------------------------------- builders


def write_image(
    path: Path, size: tuple[int, int] = (6, 4), color: tuple[int, int, int] = (10, 20, 30)
) -> Path:
    """An RGB image of ``size`` = (width, height); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_label(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L").save(path)
    return path


def make_imagenet_flat(root: Path) -> Path:
    (root / "synset_words.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "synset_words.txt").write_text("n002 second, other name\nn001 first\n")
    write_image(root / "images" / "n001_a.JPEG")
    write_image(root / "images" / "n002_b.jpeg")
    write_image(root / "images" / "n001_c.png")
    (root / "images" / "notes.txt").write_text("not an image, ignored")
    return root


def make_camvid_split(split_dir: Path, labels: list[np.ndarray]) -> Path:
    for k, lab in enumerate(labels):
        h, w = lab.shape
        write_image(split_dir / "images" / f"f{k:03d}.jpg", (w, h))
        write_label(split_dir / "labels" / f"f{k:03d}.png", lab)
    return split_dir


CAMVID_LABEL = np.array([[0, 3, 10], [11, 5, 11]])  # 11 = void


# ----------------------------------------------------------------------------- classification layouts


def test_imagenet_flat(tmp_path: Path) -> None:
    ds = open_dataset(make_imagenet_flat(tmp_path / "inet"))
    assert ds.layout == "imagenet-flat" and ds.task == "classification"
    assert ds.class_names == ["second", "first"] and ds.num_classes == 2
    assert [p.name for p in (ds.path(i) for i in range(len(ds)))] == [
        "n001_a.JPEG",
        "n001_c.png",
        "n002_b.jpeg",
    ]
    assert [ds.load(i)[1] for i in range(len(ds))] == [1, 1, 0]
    img, _ = ds.load(0)
    assert img.mode == "RGB" and img.size == (6, 4)


def test_imagenet_flat_unknown_wnid(tmp_path: Path) -> None:
    root = make_imagenet_flat(tmp_path / "inet")
    write_image(root / "images" / "n999_x.JPEG")
    with pytest.raises(DynavitError, match=r"n999_x\.JPEG.*'n999'"):
        open_dataset(root)


def test_class_folders_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "cf"
    write_image(root / "b" / "x.png")
    write_image(root / "a" / "z.JPG")
    write_image(root / "a" / "y.bmp")
    write_image(root / "a" / "nested" / "w.webp")
    ds = open_dataset(root)
    assert ds.layout == "class-folders" and ds.class_names == ["a", "b"]
    assert [ds.path(i).name for i in range(len(ds))] == ["w.webp", "y.bmp", "z.JPG", "x.png"]
    assert ds.targets == [0, 0, 0, 1]


def test_class_folders_split(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        write_image(root / split / "n001" / "x.png")
        write_image(root / split / "n002" / "y.png")
    ds = open_dataset(root, split="val")
    assert ds.root == root / "val" and ds.class_names == ["n001", "n002"] and ds.targets == [0, 1]
    with pytest.raises(DynavitError, match=r"split folder .*test does not exist"):
        open_dataset(root, split="test")


def test_class_folders_follow_synset_file(tmp_path: Path) -> None:
    root = tmp_path / "cf"
    write_image(root / "n001" / "x.png")
    write_image(root / "n003" / "y.png")
    (root / "synset_words.txt").write_text("n003 three\nn002 two\nn001 one\n")
    ds = open_dataset(root)
    assert ds.layout == "class-folders" and ds.class_names == ["three", "two", "one"]
    assert ds.targets == [2, 0]
    write_image(root / "n777" / "z.png")
    with pytest.raises(DynavitError, match=r"n777.*not listed"):
        open_dataset(root)


# ----------------------------------------------------------------------------- segmentation layouts


def test_camvid_void_to_255_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "camvid"
    make_camvid_split(root / "train", [CAMVID_LABEL] * 3)
    make_camvid_split(root / "val", [CAMVID_LABEL] * 2)
    ds = open_dataset(root)
    assert ds.layout == "camvid" and len(ds) == 2 and ds.num_classes == 11  # default split: val
    assert ds.class_names[0] == "Sky" and ds.class_names[-1] == "Bicyclist" and ds.ignore_index == 255
    img, target = ds.load(0)
    assert target.dtype == np.int64 and img.size == (3, 2)
    np.testing.assert_array_equal(target, [[0, 3, 10], [255, 5, 255]])
    assert len(open_dataset(root, split="train")) == 3
    assert len(open_dataset(root / "train")) == 3  # a split folder itself
    with pytest.raises(DynavitError, match=r"no split 'test'.*train, val"):
        open_dataset(root, split="test")
    with pytest.raises(DynavitError, match="no split 'test'"):
        open_dataset(root / "val", split="test")


def test_cityscapes_standard_layout(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    for split, city, n in (("val", "frankfurt", 2), ("train", "aachen", 1)):
        for k in range(n):
            stem = f"{city}_000000_{k:06d}"
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", (3, 2))
            lab = np.array([[0, 18, 255], [19, 7, 254]])
            write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", lab)
            write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab + 1)
    ds = open_dataset(root)
    assert ds.layout == "cityscapes" and len(ds) == 2 and ds.num_classes == 19
    assert ds.class_names[:3] == ["road", "sidewalk", "building"] and ds.class_names[-1] == "bicycle"
    np.testing.assert_array_equal(ds.load(1)[1], [[0, 18, 255], [255, 7, 255]])
    assert len(open_dataset(root, "cityscapes", split="train")) == 1
    with pytest.raises(DynavitError, match=r"no split 'test' \(splits found: train, val\)"):
        open_dataset(root, split="test")


def test_cityscapes_flat_layout_and_missing_label(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write_image(root / "x_000000_000001_leftImg8bit.png", (3, 2))
    write_label(root / "x_000000_000001_gtFine_labelTrainIds.png", np.array([[1, 2, 3], [255, 0, 0]]))
    ds = open_dataset(root)
    assert ds.layout == "cityscapes" and len(ds) == 1
    np.testing.assert_array_equal(ds.load(0)[1], [[1, 2, 3], [255, 0, 0]])
    write_image(root / "y_000000_000002_leftImg8bit.png", (3, 2))
    with pytest.raises(DynavitError, match=r"y_000000_000002_leftImg8bit\.png has no label.*labelTrainIds"):
        open_dataset(root)


@pytest.mark.parametrize("split_folders", [True, False])
def test_ade20k_zero_is_void_and_shift(tmp_path: Path, split_folders: bool) -> None:
    root = tmp_path / "ade"
    sub = "validation" if split_folders else ""
    write_image(root / "images" / sub / "ADE_val_00000001.jpg", (4, 1))
    write_label(root / "annotations" / sub / "ADE_val_00000001.png", np.array([[0, 1, 150, 77]]))
    ds = open_dataset(root)
    assert ds.layout == "ade20k" and ds.num_classes == 150
    assert ds.class_names[0] == "wall" and ds.class_names[-1] == "flag" and len(set(ds.class_names)) == 150
    np.testing.assert_array_equal(ds.load(0)[1], [[255, 0, 149, 76]])


# ----------------------------------------------------------------------------- errors


def test_missing_folder_and_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(DynavitError, match=r"nowhere does not exist"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DynavitError, match="is not a folder"):
        open_dataset(tmp_path / "file.txt")


def test_unknown_layout_lists_every_layout(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DynavitError, match="matches no dataset layout") as err:
        open_dataset(tmp_path)
    for name, cls in LAYOUTS.items():
        assert name in str(err.value) and cls.expects in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DynavitError, match="unknown dataset layout 'voc'"):
        open_dataset(tmp_path, "voc")
    with pytest.raises(DynavitError, match="is not a camvid dataset: expected images/ and labels/"):
        open_dataset(tmp_path, "camvid")


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    assert detect_layout(tmp_path) == "camvid"
    with pytest.raises(DynavitError, match=r"no images found in .*camvid layout expects"):
        open_dataset(tmp_path)


def test_image_without_label(tmp_path: Path) -> None:
    make_camvid_split(tmp_path, [CAMVID_LABEL])
    write_image(tmp_path / "images" / "orphan.jpg")
    with pytest.raises(DynavitError, match=r"orphan\.jpg has no label: expected .*labels/orphan\.png"):
        open_dataset(tmp_path)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_image_names_the_file(tmp_path: Path, kind: str) -> None:
    root = make_imagenet_flat(tmp_path / "inet")
    good = root / "images" / "n001_a.JPEG"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, quality=95)
    bad = root / "images" / "n001_bad.JPEG"
    data = {"garbage": b"this is not a jpeg", "truncated": good.read_bytes()[:300], "empty": b""}[kind]
    bad.write_bytes(data)
    ds = open_dataset(root)
    i = [ds.path(k).name for k in range(len(ds))].index("n001_bad.JPEG")
    with pytest.raises(BadSampleError, match=r"n001_bad\.JPEG") as err:
        ds.load(i)
    assert err.value.path == bad and isinstance(err.value, DynavitError)


def test_label_size_mismatch_and_rgb_label(tmp_path: Path) -> None:
    make_camvid_split(tmp_path, [CAMVID_LABEL, CAMVID_LABEL])
    write_label(tmp_path / "labels" / "f001.png", np.zeros((5, 5)))
    Image.new("RGB", (3, 2)).save(tmp_path / "labels" / "f000.png")
    ds = open_dataset(tmp_path)
    with pytest.raises(BadSampleError, match=r"f000\.png.*single-channel"):
        ds.load(0)
    with pytest.raises(BadSampleError, match=r"f001\.png.*label size 5x5 differs from image size 3x2"):
        ds.load(1)


def test_subset_and_limit(tmp_path: Path) -> None:
    root = tmp_path / "cf"
    for k in range(10):
        write_image(root / f"c{k}" / "x.png")
    ds = open_dataset(root)
    assert open_dataset(root, limit=5).targets == [0, 2, 4, 6, 8]  # spread over the classes
    assert ds.subset([3, 1]).targets == [3, 1] and len(ds) == 10
    assert ds.limit(None) is ds and len(ds.limit(50)) == 10
    assert json.dumps(ds.describe())


# ----------------------------------------------------------------------------- transforms


def test_classification_transform_deit_protocol() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    t = ClassificationTransform()
    assert t.resize == 256 and t.crop == (224, 224)
    assert resize_shorter_side(img, 256, Image.Resampling.BICUBIC).size == (341, 256)  # int(256 * 500 / 375)
    x = t(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # same as doing it by hand: bicubic resize, crop offsets round((341-224)/2)=58, round((256-224)/2)=16
    ref = (
        np.asarray(img.resize((341, 256), Image.Resampling.BICUBIC).crop((58, 16, 282, 240)), np.float32)
        / 255
    )
    ref = (ref - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    assert ClassificationTransform(crop=(224, 160)).__call__(img).shape == (3, 224, 160)
    assert json.dumps(t.to_dict())


def test_normalisation_of_constant_colour() -> None:
    x = ClassificationTransform()(Image.new("RGB", (300, 400), (200, 100, 50)))
    # (200/255 - 0.485)/0.229 = 0.2993137/0.229, (100/255 - 0.456)/0.224 = -0.0638431/0.224,
    # (50/255 - 0.406)/0.225 = -0.2099216/0.225
    expected = [1.3070468, -0.2850140, -0.9329847]
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), expected[c], atol=1e-5)


def test_segmentation_transform() -> None:
    img = Image.new("RGB", (48, 32), (255, 0, 0))
    assert SegmentationTransform()(img).shape == (3, 32, 48)
    x = SegmentationTransform(size=(16, 24), mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert x.shape == (3, 16, 24) and torch.allclose(x[0], torch.ones(16, 24))
    assert SegmentationTransform(size=8).to_dict()["size"] == [8, 8]


def test_transform_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        ClassificationTransform(interpolation="cubic-ish")
    with pytest.raises(ValueError, match="at least the crop"):
        ClassificationTransform(crop=224, resize=200)


# ----------------------------------------------------------------------------- real assets


@pytest.mark.assets
def test_real_imagenet_samples(assets: Path) -> None:
    ds = open_dataset(assets / "imagenet-samples")
    assert ds.layout == "imagenet-flat" and len(ds) == 500 and ds.num_classes == 1000
    names = [ds.path(i).name for i in range(len(ds))]
    img, label = ds.load(names.index("n01440764_tench.JPEG"))
    assert label == 0 and ds.class_names[0] == "tench" and img.mode == "RGB"
    assert all(t % 2 == 0 for t in ds.targets)  # the samples are the even classes


@pytest.mark.assets
def test_real_camvid_val(assets: Path) -> None:
    for root, split in (
        (assets / "camvid", None),
        (assets / "camvid" / "val", None),
        (assets / "camvid", "val"),
    ):
        assert len(open_dataset(root, split=split)) == 101
    ds = open_dataset(assets / "camvid")
    values: set[int] = set()
    for i in range(0, len(ds), 10):
        img, target = ds.load(i)
        assert target.shape == (img.height, img.width) == (360, 480)
        values |= set(np.unique(target).tolist())
    assert values <= set(range(11)) | {255} and 255 in values and len(values) > 5


@pytest.mark.assets
def test_real_cityscapes_mini_flat(assets: Path) -> None:
    ds = open_dataset(assets / "cityscapes-mini")
    assert ds.layout == "cityscapes" and len(ds) == 1
    img, target = ds.load(0)
    assert img.size == (256, 128) and target.shape == (128, 256)
    assert set(np.unique(target).tolist()) <= set(range(19)) | {255}
