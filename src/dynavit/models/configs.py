"""Named architecture presets, randomly initialised: cost studies need shapes, not weights.

``dynavit.load("config:segformer-b2")`` builds one; FLOPs and latency do not depend on the
weights, so a profile of a preset is the profile of the pretrained model of that shape.
"""

from __future__ import annotations

from typing import Any

from dynavit.errors import DynavitError

# SegFormer (Xie et al. 2021, Table 6 / NVlabs configs): encoder depths, widths, decoder width
_SEGFORMER = {
    "b0": ([2, 2, 2, 2], [32, 64, 160, 256], 256),
    "b1": ([2, 2, 2, 2], [64, 128, 320, 512], 256),
    "b2": ([3, 4, 6, 3], [64, 128, 320, 512], 768),
    "b3": ([3, 4, 18, 3], [64, 128, 320, 512], 768),
    "b4": ([3, 8, 27, 3], [64, 128, 320, 512], 768),
    "b5": ([3, 6, 40, 3], [64, 128, 320, 512], 768),
}
_VIT = {  # hidden, layers, heads (DeiT/ViT naming)
    "vit-t16": (192, 12, 3), "vit-s16": (384, 12, 6), "vit-b16": (768, 12, 12), "vit-l16": (1024, 24, 16),
}
_SWIN = {  # embed dim, depths, heads
    "swin-t": (96, [2, 2, 6, 2], [3, 6, 12, 24]), "swin-s": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "swin-b": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
}


def segformer_config(variant: str, num_labels: int = 150) -> Any:
    from transformers import SegformerConfig

    depths, hidden, dec = _SEGFORMER[variant]
    return SegformerConfig(depths=depths, hidden_sizes=hidden, decoder_hidden_size=dec, num_labels=num_labels)


def preset_names() -> list[str]:
    return [f"segformer-{v}" for v in _SEGFORMER] + list(_VIT) + list(_SWIN)


def preset_config(name: str) -> Any:
    """The transformers config of a named preset (ImageNet-1k heads, ADE20K's 150 classes)."""
    from transformers import SwinConfig, ViTConfig

    key = name.lower()
    if key.startswith("segformer-") and key[10:] in _SEGFORMER:
        return segformer_config(key[10:])
    if key in _VIT:
        h, n, heads = _VIT[key]
        return ViTConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                         intermediate_size=4 * h, num_labels=1000)
    if key in _SWIN:
        d, depths, heads = _SWIN[key]
        return SwinConfig(embed_dim=d, depths=depths, num_heads=heads, num_labels=1000)
    raise DynavitError(f"unknown preset {name!r} (choose from {', '.join(preset_names())})")
