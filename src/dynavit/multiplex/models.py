"""Several images in one ViT forward pass: ConcatPlexer and its naive baseline, the Image Multiplexer.

Both are built from a single-image ``DynViT`` (its weights are copied, so the original stays
usable as the distillation teacher) and split it in two:

- **patchifier** (per image): the patch embedding, position embeddings and the first
  ``patchifier_depth`` blocks, at the image's full token count;
- **backbone** (shared): the remaining blocks, which see the tokens of N images in one
  sequence of about one image's length, so each image pays ~1/N of the backbone.

How the N token sets share the backbone is the difference:

- ``ConcatPlexer`` (Han et al. 2023): a convolutional multiplexer shrinks each image's token
  grid by N (kernel = stride = ``reduction(N)``, initialised as average pooling so a pretrained
  backbone sees a lower-resolution image at the start), a learned slot embedding tells the
  images apart, and the N sets ``[CLS_i, tokens_i]`` are **concatenated along dim 1**. Attention
  is not masked: the images are processed together. Demultiplexing reads each slot's CLS.
- ``ImageMultiplexer`` (DataMUX, Murahari et al. 2022, ported to images): every image keeps its
  full token sequence, which is **bound** to its slot (Gaussian Hadamard keys, ``mean_i(e_i * v_i)``,
  or random orthogonal matrices, ``sum_i W_i e_i / sqrt(N)``) and **superposed** into one sequence
  of the usual length, prefixed by N index tokens; the ``index`` demultiplexer feeds
  ``MLP([h_index_i ; h_CLS])`` to the head, the ``mlp`` one a per-slot MLP of ``h_CLS``.

Group layout and padding (one rule for every caller: training, evaluation, sweeps, server):
a batch of B images is read as consecutive groups; image ``g*n + i`` sits in slot ``i`` of group
``g``, where ``n = plan.mux`` (<= N, the trained slot count). Slots without an image (``n < N``, or
the last group when B is not a multiple of n) get a **blank image** (all-zero normalised pixels:
the dataset's mean colour); the pass costs the same and the blank slots' outputs are dropped.
Images of different sizes cannot share a pass: a list of them is refused.

Fixed binding keys are frozen ``nn.Parameter``s rather than buffers so that the dispatch-level
profiler recognises ``W_i e_i`` as a weight matmul (``linear``), not as attention.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.config import ConfigError, ExecConfig, resolve
from dynavit.errors import DynavitError
from dynavit.knobs.tokens import TokenState
from dynavit.models.base import FamilyModel
from dynavit.models.vit import DynViT

ARCHS = ("concatplexer", "imagemux")


def reduction(n: int) -> tuple[int, int]:
    """(rows, cols) stride that keeps ~1/n of a token grid: 2 -> (2, 1), 4 -> (2, 2), 8 -> (4, 2)."""
    rows = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return n // rows, rows


def stack_images(pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A (B, 3, H, W) batch; a list of images must share one size (they share one pass)."""
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.dim() != 4:
            raise DynavitError(f"expected a (batch, 3, H, W) tensor, got shape {tuple(pixel_values.shape)}")
        return pixel_values
    sizes = sorted({tuple(p.shape[-2:]) for p in pixel_values})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise DynavitError(f"images multiplexed into one pass must share one size, got {shown}; resize them "
                           "first (the model's transform does)")
    if not sizes:
        raise DynavitError("no images to run")
    return torch.stack([p if p.dim() == 3 else p[0] for p in pixel_values])


class MuxModel(FamilyModel, abc.ABC):
    """Shared mechanics: patchifier, backbone, grouping and blank-slot padding. See the module docstring."""

    family = "multiplex"
    arch: ClassVar[str] = ""

    def __init__(self, base: DynViT, mux: int, patchifier_depth: int = 1) -> None:
        if not isinstance(base, DynViT):
            raise ConfigError(f"multiplexing needs a ViT/DeiT model (DynViT), got {type(base).__name__}")
        if isinstance(mux, bool) or not isinstance(mux, int) or mux < 2:
            raise ConfigError(f"mux={mux!r} must be an integer >= 2 (images per forward pass)")
        depth = len(base.blocks)
        if not 0 <= patchifier_depth < depth:
            raise ConfigError(f"patchifier_depth={patchifier_depth} is outside 0..{depth - 1} (the ViT has {depth} "
                              "blocks and the backbone needs at least one)")
        super().__init__(base)
        self.vit = copy.deepcopy(base)  # own weights: the single-image model stays intact (teacher)
        self.vit.set_plan(self.vit.default_plan())
        self.mux, self.patchifier_depth = mux, patchifier_depth
        self.dim = self.vit.cls_token.shape[-1]
        self.space = dataclasses.replace(base.space, family=f"multiplex-{self.arch}", max_mux=mux)

    def _ready(self) -> None:
        """Call at the end of a subclass ``__init__``: the default plan fills all N slots."""
        self.set_plan(resolve(ExecConfig(mux=self.mux), self.space))

    @property
    def num_labels(self) -> int:
        return int(self.vit.head.out_features)

    def spec(self) -> dict:
        """What rebuilds this model's structure (saved beside its weights)."""
        return {"arch": self.arch, "mux": self.mux, "patchifier_depth": self.patchifier_depth}

    # ---- the two halves -------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + T, d): CLS + patch tokens after the per-image blocks."""
        carry = self.vit.begin(x)
        for i in range(self.patchifier_depth):
            carry = self.vit.step(carry, i)
        return carry[0]

    def backbone(self, seq: torch.Tensor) -> torch.Tensor:
        carry = (seq, TokenState())
        for i in range(self.patchifier_depth, len(self.vit.blocks)):
            carry = self.vit.step(carry, i)
        return carry[0]

    @abc.abstractmethod
    def multiplexed(self, x: torch.Tensor) -> torch.Tensor:
        """(G*N, 3, H, W) in group-major slot order -> (G*N, classes) in the same order."""

    # ---- grouping -------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        x = stack_images(pixel_values).to(self.vit.patch.weight.dtype)
        n = self.plan.mux if self.plan is not None and self.plan.mux > 1 else self.mux
        b, slots = x.shape[0], self.mux
        groups = -(-b // n)
        if groups * n > b:
            x = torch.cat([x, x.new_zeros(groups * n - b, *x.shape[1:])])
        x = x.reshape(groups, n, *x.shape[1:])
        if n < slots:
            x = torch.cat([x, x.new_zeros(groups, slots - n, *x.shape[2:])], dim=1)
        logits = self.multiplexed(x.reshape(groups * slots, *x.shape[2:]))
        return logits.reshape(groups, slots, -1)[:, :n].reshape(groups * n, -1)[:b]


class ConcatPlexer(MuxModel):
    """Reduced token sets of N images, concatenated along the sequence (dim 1). See the module docstring."""

    arch = "concatplexer"

    def __init__(self, base: DynViT, mux: int, patchifier_depth: int = 1) -> None:
        super().__init__(base, mux, patchifier_depth)
        self.stride = reduction(mux)
        d = self.dim
        self.reduce = nn.Conv2d(d, d, kernel_size=self.stride, stride=self.stride)
        with torch.no_grad():  # average pooling at the start: a pretrained backbone sees a coarser image
            self.reduce.weight.zero_()
            self.reduce.weight[torch.arange(d), torch.arange(d)] = 1.0 / (self.stride[0] * self.stride[1])
            self.reduce.bias.zero_()
        self.slot_embed = nn.Parameter(torch.empty(mux, 1, d))
        nn.init.trunc_normal_(self.slot_embed, std=0.02, generator=torch.Generator().manual_seed(mux))
        self._ready()

    def multiplexed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(x)
        cls, grid = tokens[:, :1], tokens[:, 1:]
        gh, gw = (side // self.vit.patch_size for side in x.shape[-2:])
        grid = grid.transpose(1, 2).reshape(len(x), self.dim, gh, gw)
        sh, sw = self.stride
        grid = F.pad(grid, (0, -gw % sw, 0, -gh % sh))  # a grid that does not divide: zero tokens at the edge
        reduced = self.reduce(grid).flatten(2).transpose(1, 2)
        seq = torch.cat([cls, reduced], dim=1)
        per_slot = seq.shape[1]
        seq = (seq.reshape(-1, self.mux, per_slot, self.dim) + self.slot_embed).reshape(-1, self.mux * per_slot,
                                                                                        self.dim)
        seq = self.backbone(seq)
        cls_out = seq.reshape(-1, self.mux, per_slot, self.dim)[:, :, 0].reshape(-1, self.dim)
        return self.vit.head(self.vit.norm(cls_out))


class ImageMultiplexer(MuxModel):
    """DataMUX for images: bind each image's tokens to its slot and superpose. See the module docstring."""

    arch = "imagemux"

    def __init__(self, base: DynViT, mux: int, patchifier_depth: int = 1, *, keys: str = "gaussian",
                 demux: str = "index", learn_keys: bool = False, seed: int = 0) -> None:
        super().__init__(base, mux, patchifier_depth)
        if keys not in ("gaussian", "ortho"):
            raise ConfigError(f"keys={keys!r} must be 'gaussian' (Hadamard) or 'ortho' (random orthogonal)")
        if demux not in ("index", "mlp"):
            raise ConfigError(f"demux={demux!r} must be 'index' or 'mlp'")
        self.keys_kind, self.demux_kind, self.learn_keys, self.seed = keys, demux, learn_keys, seed
        d = self.dim
        g = torch.Generator().manual_seed(seed)
        if keys == "gaussian":  # unit-variance entries: binding keeps each token's scale on average
            k = torch.randn(mux, d, generator=g)
        else:
            k = torch.linalg.qr(torch.randn(mux, d, d, generator=g))[0]
        self.keys = nn.Parameter(k, requires_grad=learn_keys)
        if demux == "index":
            self.index_tokens = nn.Parameter(torch.empty(1, mux, d))
            nn.init.trunc_normal_(self.index_tokens, std=0.02, generator=g)
            self.demux = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.LayerNorm(d))
        else:
            self.demux = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d)) for _ in range(mux))
        self._ready()

    def spec(self) -> dict:
        return {**super().spec(), "keys": self.keys_kind, "demux": self.demux_kind, "learn_keys": self.learn_keys,
                "seed": self.seed}

    def bind(self, tokens: torch.Tensor) -> torch.Tensor:
        """(G, N, L, d) -> (G, L, d): each slot's tokens bound to its key, then superposed."""
        if self.keys_kind == "gaussian":
            return (tokens * self.keys[:, None, :]).mean(1)
        return sum(F.linear(tokens[:, i], self.keys[i]) for i in range(self.mux)) / math.sqrt(self.mux)

    def multiplexed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(x)
        mixed = self.bind(tokens.reshape(-1, self.mux, *tokens.shape[1:]))
        g = mixed.shape[0]
        if self.demux_kind == "index":
            seq = self.backbone(torch.cat([self.index_tokens.expand(g, -1, -1), mixed], dim=1))
            h_idx, h_cls = seq[:, :self.mux], seq[:, self.mux:self.mux + 1].expand(-1, self.mux, -1)
            feats = self.demux(torch.cat([h_idx, h_cls], dim=-1))
        else:
            h_cls = self.backbone(mixed)[:, 0]
            feats = torch.stack([m(h_cls) for m in self.demux], dim=1)
        return self.vit.head(feats.reshape(-1, self.dim))


def build(base: DynViT | object, arch: str, mux: int, patchifier_depth: int = 1, **kw: object) -> MuxModel:
    """A multiplexed model of ``arch`` ('concatplexer' or 'imagemux') from a ViT (DynViT or DynamicModel)."""
    impl = getattr(base, "_base", None) or base  # a DynamicModel's own ViT, whatever path it is on
    if arch == "concatplexer":
        if kw:
            raise ConfigError(f"the ConcatPlexer takes no {', '.join(kw)} option")
        return ConcatPlexer(impl, mux, patchifier_depth)
    if arch == "imagemux":
        return ImageMultiplexer(impl, mux, patchifier_depth, **kw)
    raise ConfigError(f"arch={arch!r} is not a multiplexer (choose from {', '.join(ARCHS)})")
