"""The dataset layouts on disk: ImageNet-style classification, CamVid/Cityscapes/ADE20K segmentation,
unlabelled images, and ``open_dataset``, which detects which one a folder is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from dynavit.data.base import ClassificationDataset, ImageDataset, SegmentationDataset
from dynavit.data.files import (
    SYNSET_FILES,
    find_synset_file,
    has_images,
    list_images,
    read_synset_file,
    require_dir,
    subfolders,
)
from dynavit.errors import DynavitError

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


# ----------------------------------------------------------------------------- layouts


class ImageNetFlatDataset(ClassificationDataset):
    """``images/<wnid>_<anything>.JPEG`` + ``synset_words.txt`` (line k = class k)."""

    layout = "imagenet-flat"
    expects = "images/<wnid>_<name>.JPEG and synset_words.txt ('wnid name, synonyms' per line)"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / "images").is_dir() and find_synset_file(root) is not None

    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        synset = find_synset_file(self.root)
        if synset is None:
            raise DynavitError(
                f"{self.root} has no {SYNSET_FILES[0]} (the {self.layout} layout expects {self.expects})"
            )
        wnids, names = read_synset_file(synset)
        index = {w: k for k, w in enumerate(wnids)}
        images = list_images(require_dir(self.root / "images", "image folder"))
        targets = []
        for p in images:
            wnid = p.name.split("_", 1)[0]
            if wnid not in index:
                raise DynavitError(f"{p}: WordNet id {wnid!r} (the file name up to '_') is not in {synset}")
            targets.append(index[wnid])
        return names, images, targets


class ClassFoldersDataset(ClassificationDataset):
    """``<class>/<image>`` (ImageFolder convention); ``synset_words.txt`` in the root fixes the order."""

    layout = "class-folders"
    expects = (
        "one subfolder of images per class (class index = sorted folder position or synset_words.txt order)"
    )

    @classmethod
    def matches(cls, root: Path) -> bool:
        # images loose in the root belong to no class: such a folder is not a class-folders dataset
        return not has_images(root) and any(has_images(d, recursive=True) for d in subfolders(root))

    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        folders = subfolders(self.root)
        synset = find_synset_file(self.root)
        if synset is not None:
            wnids, names = read_synset_file(synset)
            index = {w: k for k, w in enumerate(wnids)}
            unknown = [d.name for d in folders if d.name not in index]
            if unknown:
                raise DynavitError(f"class folder {self.root / unknown[0]} is not listed in {synset}")
        else:
            names = [d.name for d in folders]
            index = {n: k for k, n in enumerate(names)}
        images: list[Path] = []
        targets: list[int] = []
        for d in folders:
            found = list_images(d, recursive=True)
            images += found
            targets += [index[d.name]] * len(found)
        return names, images, targets


class CamVidDataset(SegmentationDataset):
    """``[<split>/]images/*.jpg`` + ``labels/<stem>.png`` (SegNet CamVid), 11 = void."""

    layout = "camvid"
    expects = "images/ and labels/ (label = image stem + .png), in the folder itself or in <split>/"
    default_split = "val"
    CLASS_NAMES = CAMVID_CLASSES

    @staticmethod
    def _is_split(d: Path) -> bool:
        return (d / "images").is_dir() and (d / "labels").is_dir()

    @classmethod
    def matches(cls, root: Path) -> bool:
        return cls._is_split(root) or any(cls._is_split(root / s) for s in ("train", "val", "test"))

    def _images_and_label_paths(self) -> list[tuple[Path, Path]]:
        data = self._choose_split(self.root, self._is_split)
        return [(p, data / "labels" / f"{p.stem}.png") for p in list_images(data / "images")]


class CityscapesDataset(SegmentationDataset):
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/...*_gtFine_labelTrainIds.png``.

    Also the flat layout with both files in one folder. Train ids come from cityscapesscripts'
    ``createTrainIdLabelImgs``; raw ``labelIds`` would give wrong classes, so they are not used.
    """

    layout = "cityscapes"
    expects = (
        "leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png, "
        "or both kinds of file in one folder"
    )
    default_split = "val"
    CLASS_NAMES = CITYSCAPES_CLASSES
    IMAGE_SUFFIX: ClassVar[str] = "_leftImg8bit"
    LABEL_SUFFIX: ClassVar[str] = "_gtFine_labelTrainIds.png"

    @classmethod
    def _is_split(cls, d: Path) -> bool:
        """``<split>/<city>/*_leftImg8bit.png``: two levels deep, so ``leftImg8bit/`` is not a split."""
        return any(has_images(city, stem_suffix=cls.IMAGE_SUFFIX) for city in subfolders(d))

    @classmethod
    def matches(cls, root: Path) -> bool:
        standard = (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()
        return standard or has_images(root, stem_suffix=cls.IMAGE_SUFFIX)

    def _label_name(self, image: Path) -> str:
        return image.stem[: -len(self.IMAGE_SUFFIX)] + self.LABEL_SUFFIX

    def _images_and_label_paths(self) -> list[tuple[Path, Path]]:
        if has_images(self.root, stem_suffix=self.IMAGE_SUFFIX):
            return [(p, p.with_name(self._label_name(p))) for p in self._list(self.root, recursive=False)]
        images_root = require_dir(self.root / "leftImg8bit", "image folder")
        split_dir = self._choose_split(images_root, self._is_split)
        labels_root = self.root / "gtFine"
        return [
            (p, labels_root / p.parent.relative_to(images_root) / self._label_name(p))
            for p in self._list(split_dir, recursive=True)
        ]

    def _list(self, folder: Path, recursive: bool) -> list[Path]:
        return list_images(folder, recursive=recursive, stem_suffix=self.IMAGE_SUFFIX)


class ADE20KDataset(SegmentationDataset):
    """``images/<split>/*.jpg`` + ``annotations/<split>/*.png`` (SceneParsing); label 0 = void."""

    layout = "ade20k"
    expects = (
        "images/<split>/*.jpg with annotations/<split>/<stem>.png (or images/ and annotations/ directly)"
    )
    default_split = "validation"
    CLASS_NAMES = ADE20K_CLASSES
    label_offset = 1

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / "images").is_dir() and (root / "annotations").is_dir()

    def _images_and_label_paths(self) -> list[tuple[Path, Path]]:
        images_root = require_dir(self.root / "images", "image folder")
        labels_root = self.root / "annotations"
        split_dir = self._choose_split(images_root, has_images)
        return [
            (p, labels_root / p.parent.relative_to(images_root) / f"{p.stem}.png")
            for p in list_images(split_dir)
        ]


class UnlabelledImages(ImageDataset):
    """Image files at any depth, no labels: for label-free training (distillation needs only images).

    Detected last, so a folder that matches a labelled layout keeps its labels. Targets are -1.
    """

    layout = "images"
    task = "unlabelled"
    expects = "image files (at any depth); no labels"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return has_images(root, recursive=True)

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], root: str | Path = "images") -> UnlabelledImages:
        """The given files as one unlabelled dataset (e.g. images gathered from several datasets)."""
        new = cls.__new__(cls)
        new.split, new.root = None, Path(root)
        new.class_names, new.num_classes = [], 0
        new._images = [Path(p) for p in paths]
        new._targets = [-1] * len(new._images)
        return new

    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        images = list_images(self.root, recursive=True)
        return [], images, [-1] * len(images)

    def _target(self, i: int, img: Image.Image) -> int:
        return -1


# ----------------------------------------------------------------------------- entry point

# Detection order matters: specific layouts first, the permissive class-folders and images last.
LAYOUTS: dict[str, type[ImageDataset]] = {
    cls.layout: cls
    for cls in (ImageNetFlatDataset, CamVidDataset, CityscapesDataset, ADE20KDataset, ClassFoldersDataset,
                UnlabelledImages)
}


def detect_layout(root: str | Path) -> str:
    """Name of the first layout ``root`` matches; DynavitError listing what each layout expects."""
    path = require_dir(Path(root).expanduser(), "dataset folder")
    for name, cls in LAYOUTS.items():
        if cls.matches(path):
            return name
    tried = "; ".join(f"{name}: {cls.expects}" for name, cls in LAYOUTS.items())
    raise DynavitError(f"{path} matches no dataset layout (tried {tried})")


def open_dataset(
    root: str | Path, layout: str | None = None, *, split: str | None = None, limit: int | None = None
) -> ImageDataset:
    """Open a dataset folder, detecting its layout unless ``layout`` names one of ``LAYOUTS``.

    ``split`` picks a subfolder for layouts that have splits (camvid: val, cityscapes: val,
    ade20k: validation by default); ``limit`` keeps that many images spread over the set.
    """
    if layout is None:
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise DynavitError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    cls = LAYOUTS[layout]
    path = require_dir(Path(root).expanduser(), "dataset folder")
    if not cls.matches(path):
        raise DynavitError(f"{path} is not a {layout} dataset: expected {cls.expects}")
    return cls(path, split=split).limit(limit)
