"""The fallback family: a source model dynavit has no own forward for runs as it is, default path only.

Profiling, evaluation and serving still work on it; ``space`` has no blocks, so every knob is
refused with a ConfigError that names it, and ``DynamicModel.dynamic`` is False.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynavit.config import Space
from dynavit.models.base import FamilyModel


def _size_multiple(source: nn.Module) -> int:
    """Input sides must be multiples of the patch size (1 when the model has no patch grid)."""
    cfg = getattr(source, "config", None)
    if cfg is not None and hasattr(cfg, "patch_size"):
        p = cfg.patch_size
        return int(p if isinstance(p, int) else p[0])
    patch = getattr(getattr(source, "patch_embed", None), "patch_size", None)  # timm
    return int(patch[0]) if patch is not None else 1


class StaticModel(FamilyModel):
    """The source's own forward (transformers: ``.logits``, position embeddings interpolated at other sizes)."""

    family = "static"

    @classmethod
    def unsupported(cls, source: nn.Module) -> str:
        return ""

    def __init__(self, source: nn.Module, input_size: tuple[int, int] = (224, 224)) -> None:
        super().__init__(source)
        self.source_model = source
        self.blocks = nn.ModuleList()
        self.hf = self.config is not None
        self.input_size = tuple(input_size)
        self.space = Space(family="static", num_blocks=0, heads=(), head_dim=(), mlp_hidden=(),
                           size_multiple=_size_multiple(source), default_resolution=self.input_size)
        self.set_plan(self.default_plan())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.hf:
            return self.source_model(pixel_values)
        kwargs: dict[str, Any] = {}
        other_size = tuple(pixel_values.shape[-2:]) != self.input_size
        if other_size and getattr(self.config, "model_type", "") in ("vit", "deit"):
            kwargs["interpolate_pos_encoding"] = True
        return self.source_model(pixel_values=pixel_values, **kwargs).logits
