"""Training-time augmentation in PIL and numpy (torchvision does not import on every machine).

Every random choice comes from the ``numpy.random.Generator`` passed in, which the trainer
derives from (seed, step, slot): a resumed run draws exactly the augmentations the
uninterrupted run would have.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance

from dynavit.data.transforms import to_normalized_tensor


def _jitter(img: Image.Image, rng: np.random.Generator, strength: float = 0.25) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def segmentation_sample(img: Image.Image, label: np.ndarray, crop: tuple[int, int], base: tuple[int, int],
                        rng: np.random.Generator, mean: tuple, std: tuple, ignore_index: int = 255,
                        scale_range: tuple[float, float] = (0.5, 2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale (of ``base`` size), random crop with ignore padding, flip, photometric jitter."""
    s = float(rng.uniform(*scale_range))
    h, w = max(1, round(base[0] * s)), max(1, round(base[1] * s))
    img = img.convert("RGB").resize((w, h), Image.BILINEAR)
    lab = Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST)
    ch, cw = crop
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        canvas = Image.new("RGB", (w + pad_w, h + pad_h))
        canvas.paste(img)
        img = canvas
        lab_canvas = Image.new("L", (w + pad_w, h + pad_h), color=ignore_index)
        lab_canvas.paste(lab)
        lab = lab_canvas
    y = int(rng.integers(0, img.height - ch + 1))
    x = int(rng.integers(0, img.width - cw + 1))
    img, lab = img.crop((x, y, x + cw, y + ch)), lab.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img, lab = img.transpose(Image.FLIP_LEFT_RIGHT), lab.transpose(Image.FLIP_LEFT_RIGHT)
    img = _jitter(img, rng)
    return to_normalized_tensor(img, mean, std), torch.from_numpy(np.asarray(lab, dtype=np.int64).copy())


def classification_sample(img: Image.Image, size: tuple[int, int], rng: np.random.Generator, mean: tuple,
                          std: tuple, scale: tuple[float, float] = (0.25, 1.0)) -> torch.Tensor:
    """Random-resized crop (area ``scale``, aspect 3/4..4/3), flip, photometric jitter."""
    img = img.convert("RGB")
    area = img.width * img.height
    for _ in range(10):
        a = area * float(rng.uniform(*scale))
        ratio = math.exp(float(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
        w, h = round(math.sqrt(a * ratio)), round(math.sqrt(a / ratio))
        if 0 < w <= img.width and 0 < h <= img.height:
            x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
            img = img.crop((x, y, x + w, y + h))
            break
    img = img.resize((size[1], size[0]), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_normalized_tensor(_jitter(img, rng, 0.2), mean, std)
