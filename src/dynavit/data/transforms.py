"""Evaluation transforms in plain PIL + numpy + torch (torchvision does not import everywhere).

The classification transform reproduces the DeiT/timm evaluation protocol bit for bit
(PIL resize of the shorter side, centre crop, ``/255``, normalise), so accuracies measured
here are comparable with published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resampling(name: str) -> Image.Resampling:
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}; expected one of {sorted(_INTERPOLATIONS)}"
        ) from None


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """Normalise an int or (h, w) to (h, w) of positive ints."""
    hw = (int(size), int(size)) if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"{what} must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB, converted only if it is not: a conversion copies every pixel."""
    return img if img.mode == "RGB" else img.convert("RGB")


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in the same op order as torchvision ToTensor + Normalize."""
    img = rgb(img)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling the shorter side to ``size``: long side ``int(size * long / short)`` like torchvision.

    The long side is not capped: a thin image becomes a long one (1x16000 -> 256x4096000).
    """
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_shorter_side(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Scale so the shorter side is ``size`` (``shorter_side_size``)."""
    new = shorter_side_size(*img.size, size)
    return img if new == img.size else img.resize(new, resample)


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre crop to (h, w) with torchvision's rounding of the offsets."""
    crop_h, crop_w = size
    w, h = img.size
    if crop_h > h or crop_w > w:
        raise ValueError(f"cannot centre-crop {crop_w}x{crop_h} from a {w}x{h} image")
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


class ClassificationTransform:
    """DeiT/timm evaluation preprocessing: resize shorter side, centre crop, normalise.

    ``resize`` defaults to ``int(crop / 0.875)`` (256 for 224), the crop ratio DeiT uses.
    """

    def __init__(
        self,
        crop: int | Sequence[int] = 224,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        self.crop = _pair(crop, "crop")
        self.resize = int(max(self.crop) / 0.875) if resize is None else int(resize)
        if self.resize < max(self.crop):
            raise ValueError(f"resize ({self.resize}) must be at least the crop size {self.crop}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation
        self._resample = _resampling(interpolation)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_shorter_side(rgb(img), self.resize, self._resample)
        return to_normalized_tensor(center_crop(img, self.crop), self.mean, self.std)

    def work_size(self, w: int, h: int) -> tuple[int, int]:
        """(w, h) of the largest image this transform makes from a w x h one (the resize, before the crop).

        Known from the header alone, so a server can refuse an input before it is decoded.
        """
        return shorter_side_size(w, h, self.resize)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, so reports record exactly how inputs were made."""
        return {
            "type": "classification",
            "resize_shorter_side": self.resize,
            "crop": list(self.crop),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __repr__(self) -> str:
        return f"ClassificationTransform({self.to_dict()})"


class SegmentationTransform:
    """Resize the image to a fixed (H, W) (or keep it) and normalise.

    The label is deliberately left alone: predictions are upsampled to each label's own size,
    so the metric is computed at the annotation's native resolution.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> None:
        self.size = None if size is None else _pair(size, "size")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation
        self._resample = _resampling(interpolation)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = rgb(img)
        if self.size is not None and (img.height, img.width) != self.size:
            img = img.resize((self.size[1], self.size[0]), self._resample)
        return to_normalized_tensor(img, self.mean, self.std)

    def work_size(self, w: int, h: int) -> tuple[int, int]:
        """(w, h) of the image this transform makes from a w x h one: the fixed size, or the input's own."""
        return (w, h) if self.size is None else (self.size[1], self.size[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, so reports record exactly how inputs were made."""
        return {
            "type": "segmentation",
            "size": None if self.size is None else list(self.size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.to_dict()})"
