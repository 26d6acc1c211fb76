"""The dataset base classes: a sorted list of images with class-index or label-map targets.

Every layout is a small subclass that only says where images and labels live; listing,
decoding, label mapping, subsetting and error reporting are shared here, so all layouts fail
the same way (one ``DynavitError`` line naming the path and what was expected, or
``BadSampleError`` for a file that cannot be decoded).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dynavit.data.files import read_image, read_label, require_dir
from dynavit.errors import BadSampleError, DynavitError


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
        self.root = self._resolve_root(require_dir(Path(root).expanduser(), "dataset folder"))
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
        return require_dir(root / self.split, "split folder") if self.split else root

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
