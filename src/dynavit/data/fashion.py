"""Fashion-MNIST (Xiao et al. 2017) from its original idx files: a small, real benchmark that trains on a CPU.

The files come from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``)
or any folder named by ``$DYNAVIT_FASHION_MNIST`` holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
Images are 28x28 grey; ``size=32`` pads them with 2 black pixels per side (the background is
black), so that 4-pixel patches tile an 8x8 grid that halves and quarters exactly.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynavit.errors import DynavitError

ENV_VAR = "DYNAVIT_FASHION_MNIST"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.219,) * 3, (0.332,) * 3  # of the padded 32x32 training images
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_root(root: str | Path | None = None) -> Path:
    """The folder with the idx files: ``root``, else ``$DYNAVIT_FASHION_MNIST``, else the Debian package's."""
    root = Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()
    if not all((root / f).is_file() for f in _FILES["train"] + _FILES["test"]):
        raise DynavitError(f"Fashion-MNIST is not in {root}: install it with `apt-get install dataset-fashion-mnist`, "
                           f"or point ${ENV_VAR} to a folder with {', '.join(_FILES['train'] + _FILES['test'])}")
    return root


def read_idx(path: Path) -> np.ndarray:
    """An idx array (the MNIST file format: magic, big-endian dimensions, uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DynavitError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DynavitError(f"{path} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


class FashionMNIST:
    """One split as a classification dataset (the ``ImageDataset`` interface the trainers and evaluators use)."""

    task = "classification"
    layout = "fashion-mnist"
    ignore_index = -1
    class_names = list(CLASSES)
    num_classes = len(CLASSES)

    def __init__(self, split: str = "train", *, root: str | Path | None = None, size: int = 32) -> None:
        if split not in _FILES:
            raise DynavitError(f"Fashion-MNIST split {split!r} does not exist (choose train or test)")
        if size < 28 or (size - 28) % 2:
            raise DynavitError(f"size={size} must be 28 or 28 plus an even padding")
        self.root = fashion_root(root)
        self.split, self.size = split, size
        images, labels = (read_idx(self.root / f) for f in _FILES[split])
        pad = (size - 28) // 2
        self.images = np.pad(images, ((0, 0), (pad, pad), (pad, pad))) if pad else images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])

    def subset(self, indices: Any) -> FashionMNIST:
        idx = np.asarray(list(indices), dtype=np.int64)
        new = object.__new__(FashionMNIST)
        new.__dict__.update(self.__dict__, images=self.images[idx], labels=self.labels[idx])
        return new

    def tensors(self, mean: tuple = MEAN, std: tuple = STD) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as normalised (N, 3, size, size) floats and their labels: evaluation without PIL."""
        x = torch.from_numpy(self.images).float().div_(255)[:, None].expand(-1, 3, -1, -1)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        return ((x - m) / s).contiguous(), torch.from_numpy(self.labels)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "task": self.task, "split": self.split,
                "num_classes": self.num_classes, "n_images": len(self), "size": self.size}
