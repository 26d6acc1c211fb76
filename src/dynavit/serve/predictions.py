"""The prediction part of an answer: top-k labels, or a segmentation mask of bounded size.

These run off the event loop (on the server's thread for image-sized work): a mask is upsampled and PNG-encoded,
which for a large image took seconds on the loop and blocked every other request, health
checks included. The mask is the image's own size up to ``max_mask_pixels``, above that the
largest size of the image's aspect ratio within it; the answer says which (``mask_size`` next
to ``image_size``), and a client scales it back with nearest-neighbour resampling.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAX_MASK_PIXELS = 1 << 20  # 1024 x 1024: a 4 MP mask of 150 classes would upsample 2.4 GB of logits at once
CHUNK_VALUES = 1 << 22  # logits upsampled at a time: 16 MB of float32, whatever the class count


def mask_size(w: int, h: int, max_pixels: int = MAX_MASK_PIXELS) -> tuple[int, int]:
    """(w, h) of the mask for a w x h image: its own size, or scaled down to at most ``max_pixels``."""
    if w * h <= max_pixels:
        return w, h
    s = math.sqrt(max_pixels / (w * h))
    return max(1, math.floor(w * s)), max(1, math.floor(h * s))


def label_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Argmax over classes of the (C, h, w) logits upsampled bilinearly to ``size`` = (w, h).

    Upsampled a few classes at a time with a running maximum, so memory is bounded by the mask,
    not by the mask times the class count. Ties go to the lower class, as ``argmax`` does.
    """
    w, h = size
    step = max(1, CHUNK_VALUES // (w * h))
    best = labels = None
    for c0 in range(0, logits.shape[0], step):
        up = F.interpolate(logits[None, c0:c0 + step].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        top, arg = up.max(0)
        if best is None:
            best, labels = top, arg + c0
        else:
            better = top > best
            best = torch.where(better, top, best)
            labels = torch.where(better, arg + c0, labels)
    return labels


def prediction(dm: Any, out: torch.Tensor, size: tuple[int, int], topk: int,
               max_mask_pixels: int = MAX_MASK_PIXELS) -> dict[str, Any]:
    """The answer's prediction for an image of ``size`` = (w, h): top-k labels, or a mask (``mask_size``)."""
    if dm.task == "segmentation":
        msize = mask_size(*size, max_mask_pixels)
        mask = label_map(out, msize)
        buf = io.BytesIO()
        Image.fromarray(mask.numpy().astype(np.uint8)).save(buf, format="PNG")
        present = sorted(int(c) for c in torch.unique(mask))
        return {"task": "segmentation", "mask_png_base64": base64.b64encode(buf.getvalue()).decode(),
                "mask_size": list(msize), "image_size": list(size),
                "classes": {str(c): dm.id2label.get(c, str(c)) for c in present}}
    return {"task": "classification", "topk": top_labels(dm, out, topk)}


def top_labels(dm: Any, logits: torch.Tensor, topk: int) -> list[dict[str, Any]]:
    """The ``topk`` most probable classes of one image's logits: index, label and probability."""
    probs = logits.float().softmax(-1)
    p, idx = probs.topk(min(topk, probs.numel()))
    return [{"index": int(i), "label": dm.id2label.get(int(i), str(int(i))), "probability": float(v)}
            for v, i in zip(p, idx, strict=True)]
