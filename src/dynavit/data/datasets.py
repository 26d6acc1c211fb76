"""Image datasets on disk: ImageNet-style classification and CamVid/Cityscapes/ADE20K segmentation.

Every layout is a small subclass that only says where images and labels live; listing,
decoding, label mapping, subsetting and error reporting are shared by the base classes, so
all layouts fail the same way (one ``DynavitError`` line naming the path and what was
expected, or ``BadSampleError`` for a file that cannot be decoded).
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dynavit.errors import BadSampleError, DynavitError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SYNSET_FILES = ("synset_words.txt", "LOC_synset_mapping.txt")

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


# ----------------------------------------------------------------------------- file helpers


def file_sha1(path: Path) -> str:
    """Content hash of a file: tells whether two folders share an image, whatever its name."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, *, recursive: bool = False, stem_suffix: str = "") -> list[Path]:
    """Image files in ``folder`` (optionally below it) whose stem ends with ``stem_suffix``, sorted."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.stem.endswith(stem_suffix) and is_image_file(p))


def _has_images(folder: Path, *, recursive: bool = False, stem_suffix: str = "") -> bool:
    """Cheap existence check (stops at the first hit) used by layout detection."""
    if not folder.is_dir():
        return False
    found = folder.rglob("*") if recursive else folder.iterdir()
    return any(p.stem.endswith(stem_suffix) and is_image_file(p) for p in found)


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DynavitError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DynavitError(f"{what} {path} is not a folder")
    return path


def read_image(path: Path) -> Image.Image:
    """Decode fully (``load``) so corrupt or truncated files fail here, not later in a worker."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    # PIL's format plugins surface malformed data as many exception types (OSError,
    # SyntaxError, ValueError, struct.error, ...), so anything raised while decoding is the file's fault.
    except Exception as exc:
        raise BadSampleError(path, f"not a readable image ({type(exc).__name__}: {exc})") from exc


def read_label(path: Path) -> np.ndarray:
    """A single-channel label image as an integer array (palette PNGs give their indices)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img) if mode in ("L", "P", "I", "I;16", "1") else None
    except Exception as exc:
        raise BadSampleError(path, f"not a readable label image ({type(exc).__name__}: {exc})") from exc
    if arr is None:
        raise BadSampleError(path, f"label images must be single-channel class indices, got mode {mode}")
    return arr


def read_synset_file(path: Path) -> tuple[list[str], list[str]]:
    """Parse ``wnid name[, synonyms]`` lines; line k is class k. Returns (wnids, first names)."""
    wnids: list[str] = []
    names: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not wnid or wnid in wnids:
            raise DynavitError(f"{path}:{lineno}: expected 'wnid name, synonyms' with a unique wnid")
        wnids.append(wnid)
        names.append(rest.split(",")[0].strip() or wnid)
    if not wnids:
        raise DynavitError(f"{path} lists no classes (expected lines 'wnid name, synonyms')")
    return wnids, names


def _find_synset_file(folder: Path) -> Path | None:
    return next((folder / n for n in SYNSET_FILES if (folder / n).is_file()), None)


# ----------------------------------------------------------------------------- base classes


class ImageDataset(ABC):
    """A sorted list of images with class-index or label-map targets.

    Subclasses define ``_scan`` (find files, return class names, images, targets) and
    ``matches`` (cheap layout detection); ``expects`` describes the layout on disk and is
    quoted in every error message so the user knows what to fix.
    """

    layout: ClassVar[str] = ""
    task: ClassVar[str] = ""
    expects: ClassVar[str] = ""
    default_split: ClassVar[str | None] = None
    ignore_index: int = -1

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.split = split
        self.root = self._resolve_root(_require_dir(Path(root).expanduser(), "dataset folder"))
        names, images, targets = self._scan()
        if not images:
            raise DynavitError(
                f"no images found in {self.root} (the {self.layout} layout expects {self.expects})"
            )
        self.class_names: list[str] = list(names)
        self.num_classes: int = len(self.class_names)
        self._images: list[Path] = images
        self._targets: list[Any] = targets

    # -- to implement -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def matches(cls, root: Path) -> bool:
        """Whether ``root`` looks like this layout (no full scan)."""

    @abstractmethod
    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        """(class names, image paths, targets) of the whole dataset."""

    @abstractmethod
    def _target(self, i: int, img: Image.Image) -> int | np.ndarray:
        """The label of image ``i`` (decoded image given for size checks)."""

    def _resolve_root(self, root: Path) -> Path:
        """Layouts with split subfolders of their own keep the root and pick the split inside."""
        return root

    # -- shared API ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def path(self, i: int) -> Path:
        return self._images[i]

    def load(self, i: int) -> tuple[Image.Image, int | np.ndarray]:
        """(RGB image, target); raises BadSampleError naming the file when it cannot be used."""
        img = read_image(self._images[i])
        return img, self._target(i, img)

    def subset(self, indices: Iterable[int]) -> ImageDataset:
        """A view on some samples (same classes), e.g. for quick runs or sharding."""
        idx = [int(i) for i in indices]
        new = copy.copy(self)
        new._images = [self._images[i] for i in idx]
        new._targets = [self._targets[i] for i in idx]
        return new

    def limit(self, n: int | None) -> ImageDataset:
        """At most ``n`` samples spread evenly over the sorted list.

        Evenly spaced rather than the first ``n`` because files are sorted by class, and a
        quick run on the first few images would only see the first few classes.
        """
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DynavitError(f"limit must be positive, got {n}")
        return self.subset(i * len(self) // n for i in range(n))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "task": self.task,
            "split": self.split,
            "num_classes": self.num_classes,
            "n_images": len(self),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, layout={self.layout!r}, "
            f"n={len(self)}, num_classes={self.num_classes})"
        )

    # -- helpers for subclasses -----------------------------------------------------------
    def _choose_split(self, base: Path, has_data: Callable[[Path], bool]) -> Path:
        """``base/<split>`` when it holds data, else ``base`` itself (a folder that is one split)."""
        split = self.split or self.default_split
        if split and has_data(base / split):
            return base / split
        # A folder that is itself one split is fine, unless the user asked for a different split.
        if has_data(base) and (self.split is None or base.name == self.split):
            return base
        found = sorted(d.name for d in base.iterdir() if d.is_dir() and has_data(d)) if base.is_dir() else []
        raise DynavitError(
            f"{base} has no split {split!r} (splits found: {', '.join(found) or 'none'}); "
            f"the {self.layout} layout expects {self.expects}"
        )


class ClassificationDataset(ImageDataset):
    """Targets are class indices resolved when the dataset is opened (so bad names fail early)."""

    task = "classification"

    def _resolve_root(self, root: Path) -> Path:
        """``root/<split>`` when a split is asked for (e.g. ``imagenet/val/<wnid>/...``)."""
        return _require_dir(root / self.split, "split folder") if self.split else root

    def _target(self, i: int, img: Image.Image) -> int:
        return self._targets[i]

    @property
    def targets(self) -> list[int]:
        return list(self._targets)


class SegmentationDataset(ImageDataset):
    """Targets are label images; ``label_offset`` is subtracted and anything out of range is void.

    Mapping every out-of-range value to ``ignore_index`` covers CamVid's 11, Cityscapes' 255 and
    ADE20K's 0 (with offset 1) with one rule.
    """

    task = "segmentation"
    ignore_index = 255
    CLASS_NAMES: ClassVar[Sequence[str]] = ()
    label_offset: ClassVar[int] = 0

    @abstractmethod
    def _images_and_label_paths(self) -> list[tuple[Path, Path]]:
        """(image, label) file pairs of this layout."""

    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        pairs = self._images_and_label_paths()
        for image, label in pairs:
            if not label.is_file():
                raise DynavitError(f"image {image} has no label: expected {label} ({self.layout} layout)")
        return self.CLASS_NAMES, [p[0] for p in pairs], [p[1] for p in pairs]

    def label_path(self, i: int) -> Path:
        return self._targets[i]

    def _target(self, i: int, img: Image.Image) -> np.ndarray:
        path = self._targets[i]
        raw = read_label(path)
        if raw.ndim != 2 or raw.shape != (img.height, img.width):
            got = "x".join(str(s) for s in raw.shape[::-1])
            raise BadSampleError(
                path, f"label size {got} differs from image size {img.width}x{img.height} ({self.path(i)})"
            )
        return self.map_label(raw)

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> int64 class indices in [0, num_classes) or ``ignore_index``."""
        target = raw.astype(np.int64) - self.label_offset
        target[(target < 0) | (target >= len(self.CLASS_NAMES))] = self.ignore_index
        return target


# ----------------------------------------------------------------------------- layouts


class ImageNetFlatDataset(ClassificationDataset):
    """``images/<wnid>_<anything>.JPEG`` + ``synset_words.txt`` (line k = class k)."""

    layout = "imagenet-flat"
    expects = "images/<wnid>_<name>.JPEG and synset_words.txt ('wnid name, synonyms' per line)"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / "images").is_dir() and _find_synset_file(root) is not None

    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        synset = _find_synset_file(self.root)
        if synset is None:
            raise DynavitError(
                f"{self.root} has no {SYNSET_FILES[0]} (the {self.layout} layout expects {self.expects})"
            )
        wnids, names = read_synset_file(synset)
        index = {w: k for k, w in enumerate(wnids)}
        images = list_images(_require_dir(self.root / "images", "image folder"))
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
        return not _has_images(root) and any(_has_images(d, recursive=True) for d in _subfolders(root))

    def _scan(self) -> tuple[Sequence[str], list[Path], list[Any]]:
        folders = _subfolders(self.root)
        synset = _find_synset_file(self.root)
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


def _subfolders(root: Path) -> list[Path]:
    return (
        sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if root.is_dir()
        else []
    )


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
        return any(_has_images(city, stem_suffix=cls.IMAGE_SUFFIX) for city in _subfolders(d))

    @classmethod
    def matches(cls, root: Path) -> bool:
        standard = (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()
        return standard or _has_images(root, stem_suffix=cls.IMAGE_SUFFIX)

    def _label_name(self, image: Path) -> str:
        return image.stem[: -len(self.IMAGE_SUFFIX)] + self.LABEL_SUFFIX

    def _images_and_label_paths(self) -> list[tuple[Path, Path]]:
        if _has_images(self.root, stem_suffix=self.IMAGE_SUFFIX):
            return [(p, p.with_name(self._label_name(p))) for p in self._list(self.root, recursive=False)]
        images_root = _require_dir(self.root / "leftImg8bit", "image folder")
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
        images_root = _require_dir(self.root / "images", "image folder")
        labels_root = self.root / "annotations"
        split_dir = self._choose_split(images_root, _has_images)
        return [
            (p, labels_root / p.parent.relative_to(images_root) / f"{p.stem}.png")
            for p in list_images(split_dir)
        ]


# ----------------------------------------------------------------------------- entry point

# Detection order matters: specific layouts first, the permissive class-folders last.
class UnlabelledImages(ImageDataset):
    """Image files at any depth, no labels: for label-free training (distillation needs only images).

    Detected last, so a folder that matches a labelled layout keeps its labels. Targets are -1.
    """

    layout = "images"
    task = "unlabelled"
    expects = "image files (at any depth); no labels"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return _has_images(root, recursive=True)

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


LAYOUTS: dict[str, type[ImageDataset]] = {
    cls.layout: cls
    for cls in (ImageNetFlatDataset, CamVidDataset, CityscapesDataset, ADE20KDataset, ClassFoldersDataset,
                UnlabelledImages)
}


def detect_layout(root: str | Path) -> str:
    """Name of the first layout ``root`` matches; DynavitError listing what each layout expects."""
    path = _require_dir(Path(root).expanduser(), "dataset folder")
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
    path = _require_dir(Path(root).expanduser(), "dataset folder")
    if not cls.matches(path):
        raise DynavitError(f"{path} is not a {layout} dataset: expected {cls.expects}")
    return cls(path, split=split).limit(limit)
