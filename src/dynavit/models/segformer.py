"""SegFormer (Hugging Face ``SegformerForSemanticSegmentation``): dynavit's own forward pass.

Same math as transformers' SegFormer in eval mode, over the very same parameter tensors:

- encoder stage s: overlapping patch embedding (strided conv, LayerNorm), blocks, LayerNorm.
  Block: ``x += o(SDPA(q(n1(x)), k(r), v(r)))`` with ``r = LN(sr_conv(n1(x)))`` the spatially
  reduced key/value tokens (``r = n1(x)`` when sr_ratio is 1), then the Mix-FFN
  ``x += fc2(GELU(dwconv3x3(fc1(n2(x)))))``.
- all-MLP decoder: branch i reads stage i (0-based; resolution 1/2^(i+2)):
  ``up_i = bilinear(linear_c[i](f_i))`` at the 1/4 map, and
  ``y = classifier(ReLU(BN(fuse(cat(up_3, up_2, up_1, up_0)))))``.

The concat is reversed (transformers' order), so branch i owns input columns
``[(3 - i) E, (4 - i) E)`` of ``fuse``. ``fuse`` is a 1x1 conv, linear in its input, so
``fuse(cat(...)) = sum_i conv1x1(up_i, fuse.weight[:, cols_i])``. dynavit computes that sum: it
needs no concat (B2 at 512 on CPU: as fast as concat + one conv at batch 1, 24 % faster at
batch 8, where the 4E-channel concat is 1.6 GB) and makes both decoder knobs weight views.
``decoder_width`` E' keeps the first E' rows of every ``linear_c`` (hence the first E' columns of
each branch's block) and the first E' output channels of ``fuse``, BN and the classifier's input.
``decoder_branches`` (transformers' ``linear_c`` indices: 0 = the 1/4 stage, 3 = the 1/32 stage)
drops whole terms, and a stage whose output no kept branch reads (every stage after the last
kept branch) is not run at all.

Layout: tokens stay (B, N, C); spatial ops see them as channels-last (B, C, H, W) views, so the
transposes transformers materialises (NCHW copies before the SR conv, the next stage's patch
embedding and the decoder upsampling) are never made, and the decoder's 1x1 convs run on
channels-last maps (the fast oneDNN path on CPU). Branch 0 is already at 1/4: its
upsampling is the identity and is skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dynavit.config import BlockPlan, Plan, Space
from dynavit.knobs import compensate
from dynavit.knobs.layers import activation
from dynavit.knobs.permute import permute_, permute_heads, permute_units
from dynavit.knobs.width import heads_of, merge_heads, mlp, observe, observing
from dynavit.models.base import FamilyModel, Perms, resize_input


def _spatial(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, C) tokens as a channels-last (B, C, h, w) view: no copy."""
    return x.view(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def _call(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module`` on views of its own weights: ``functional_call`` (the profiler sees the module's name), or,
    under a tracer (ONNX export), which refuses that stateless API, the same op called functionally."""
    if torch.jit.is_tracing():
        w, b = params["weight"], params.get("bias", module.bias)
        return F.linear(x, w, b) if isinstance(module, nn.Linear) else module._conv_forward(x, w, b)
    return functional_call(module, params, (x,))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) map as (B, N, C) tokens (a view when the map is channels-last)."""
    return x.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.proj, self.norm = src.proj, src.layer_norm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(_tokens(x)), h, w


class Attention(nn.Module):
    """Efficient self-attention: queries from every token, keys/values from the SR-reduced map."""

    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = src.q_proj, src.k_proj, src.v_proj, src.o_proj
        self.num_heads = src.num_attention_heads
        self.head_dim = src.head_dim
        self.sr_ratio = src.sequence_reduction_ratio
        if self.sr_ratio > 1:
            self.sr, self.sr_norm = src.sequence_reduction.sequence_reduction, src.sequence_reduction.layer_norm

    def forward(self, x: torch.Tensor, h: int, w: int, heads: int, precision: str = "fp32") -> torch.Tensor:
        q = heads_of(x, self.q, heads, self.head_dim, precision=precision)
        kv = self.sr_norm(_tokens(self.sr(_spatial(x, h, w)))) if self.sr_ratio > 1 else x
        k = heads_of(kv, self.k, heads, self.head_dim, precision=precision)
        v = heads_of(kv, self.v, heads, self.head_dim, precision=precision)
        return merge_heads(F.scaled_dot_product_attention(q, k, v), self.o, precision)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> act -> fc2, on the first ``hidden`` channels."""

    def __init__(self, src: nn.Module, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.dwconv = src.fc1, src.fc2, src.dwconv.dwconv
        self.act = activation(act)

    def forward(self, x: torch.Tensor, h: int, w: int, hidden: int, precision: str = "fp32") -> torch.Tensor:
        c = self.dwconv

        def mid(y: torch.Tensor) -> torch.Tensor:  # depthwise conv on the first `hidden` channels: contiguous views
            b = None if c.bias is None else c.bias[:hidden]
            y = F.conv2d(_spatial(y, h, w), c.weight[:hidden], b, c.stride, c.padding, c.dilation, hidden)
            return self.act(_tokens(y))

        return mlp(x, self.fc1, self.fc2, hidden, mid, precision)


class Block(nn.Module):
    def __init__(self, src: nn.Module, act: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = src.layernorm_before, src.layernorm_after
        self.attn = Attention(src.attention)
        self.mlp = MixFFN(src.mlp, act)

    def forward(self, x: torch.Tensor, h: int, w: int, p: BlockPlan) -> torch.Tensor:
        if p.attn:
            out = self.attn(self.norm1(x), h, w, p.heads, p.precision)
            observe(self.attn, out)  # calibration records the sub-layer's mean output (compensation)
            x = x + out
        else:
            x = compensate.skipped(self.attn, x)
        if p.mlp:
            out = self.mlp(self.norm2(x), h, w, p.mlp_dim, p.precision)
            observe(self.mlp, out)
            x = x + out
        else:
            x = compensate.skipped(self.mlp, x)
        return x

    def permute(self, mlp_perm: torch.Tensor, head_perm: torch.Tensor) -> None:
        m, a = self.mlp, self.attn
        permute_units(mlp_perm, (m.fc1, m.dwconv), m.fc2)  # the depthwise conv has one channel per unit
        permute_heads(head_perm, ((a.q, 0), (a.k, 0), (a.v, 0)), a.o, a.head_dim)


class Decoder(nn.Module):
    """All-MLP decode head as a sum of per-branch 1x1 convs (see the module docstring).

    ``linear_c``, ``fuse`` and ``classifier`` run as themselves on views of their own weights
    (``functional_call`` points the module at the views for the duration of the call; nothing is
    copied), so the profiler reports them under their own names, as it does for transformers'
    head. BN runs functionally, in eval mode.
    """

    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(m.proj for m in src.linear_projections)
        self.fuse, self.bn, self.classifier = src.linear_fuse, src.batch_norm, src.classifier
        if self.fuse.bias is not None:
            raise ValueError("SegFormer's linear_fuse has no bias; a sum of branch terms would add it once per branch")
        self.width = self.fuse.out_channels
        self.num_branches = len(self.linear_c)
        self._fix_columns: dict[tuple[int, tuple[int, ...]], tuple[list[range], list[range]]] = {}

    def branch_columns(self, i: int) -> slice:
        """``fuse`` input columns that read branch i (transformers concatenates the branches reversed)."""
        col = (self.num_branches - 1 - i) * self.width
        return slice(col, col + self.width)

    def forward(self, feats: list[tuple[torch.Tensor, int, int]], dim: int, branches: tuple[int, ...]) -> torch.Tensor:
        """Logits from the stage outputs ``feats`` ((B, N_i, C_i) tokens, h_i, w_i), ``dim`` channels wide."""
        size = feats[0][1:]
        fused = None
        fix = self.dropped_fix(dim, branches)
        maps = {} if observing() else None
        for j, i in enumerate(branches):
            x, h, w = feats[i]
            lin = self.linear_c[i]
            u = _spatial(_call(lin, {"weight": lin.weight[:dim], "bias": lin.bias[:dim]}, x), h, w)
            observe(lin, u)  # calibration ranks branch channels on the (B, dim, h, w) map
            if (h, w) != size:
                u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
            if maps is not None:
                maps[i] = u
            col = self.branch_columns(i).start
            weight = self.fuse.weight[:dim, col:col + dim] if fix is None else fix[0][:, j * dim:(j + 1) * dim]
            y = _call(self.fuse, {"weight": weight.reshape(dim, dim, 1, 1)}, u)
            fused = y if fused is None else fused.add_(y)
        if fix is not None:  # dropped branches predicted from the kept ones (``compensate.columns``)
            fused = fused + fix[1].view(1, -1, 1, 1)
        if maps is not None and len(maps) == self.num_branches and dim == self.width:
            # the fuse input in its column order, every other pixel each way (neighbours are alike; 1/4 the memory)
            observe(self.fuse, torch.cat([maps[i][:, :, ::2, ::2] for i in reversed(range(self.num_branches))], 1))
        bn = self.bn  # eval-mode BN: running statistics, sliced to dim channels
        y = F.batch_norm(fused, bn.running_mean[:dim], bn.running_var[:dim], bn.weight[:dim], bn.bias[:dim],
                         False, 0.0, bn.eps)
        y = F.relu(y)
        observe(self.classifier, y)  # ... and the fused channels on the classifier's input
        fixed = compensate.corrected(self.classifier, dim) if dim < self.width else None
        if fixed is not None:  # the 1x1 classifier as a linear layer on channels-last pixels
            return fixed(y.movedim(1, -1)).movedim(-1, 1)
        return _call(self.classifier, {"weight": self.classifier.weight[:, :dim]}, y)

    def dropped_fix(self, dim: int, branches: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Corrected fuse weights on the kept branches (in ``branches`` order) and the bias, or None."""
        if len(branches) == self.num_branches:
            return None
        key = (dim, branches)
        if key not in self._fix_columns:  # once per path, not per forward
            cols = [range(self.branch_columns(i).start, self.branch_columns(i).start + dim)
                    for i in range(self.num_branches)]
            self._fix_columns[key] = ([cols[i] for i in branches],
                                      [cols[i] for i in range(self.num_branches) if i not in branches])
        return compensate.columns(self.fuse, dim, *self._fix_columns[key])

    def permute(self, branch_perms: list[torch.Tensor], fuse_perm: torch.Tensor) -> None:
        """Each branch's channels (its ``linear_c`` rows, its ``fuse`` columns), then the fused channels."""
        fuse_w = self.fuse.weight
        for i, bp in enumerate(branch_perms):
            bp = bp.to(fuse_w.device)
            permute_(self.linear_c[i].weight, bp)
            permute_(self.linear_c[i].bias, bp)
            cols = self.branch_columns(i)
            fuse_w[:, cols] = fuse_w[:, cols][:, bp]
        bn = self.bn
        for t in (fuse_w, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            permute_(t, fuse_perm)
        permute_(self.classifier.weight, fuse_perm, dim=1)


class DynSegformer(FamilyModel):
    """``blocks`` holds every encoder block across stages (global block index); ``decoder`` the head.

    The carry between block steps is (tokens, h, w, stage outputs so far); stage s begins with
    its patch embedding at its first block and ends with its LayerNorm after its last.
    """

    family = "segformer"
    steps = True

    @classmethod
    def unsupported(cls, source: nn.Module) -> str:
        if getattr(getattr(source, "config", None), "model_type", "") != "segformer":
            return f"{type(source).__name__} is not a SegFormer"
        return "" if hasattr(source, "decode_head") else "a SegFormer without a decode head (encoder only)"

    @classmethod
    def default_input_size(cls, source: nn.Module, preprocessor: dict) -> tuple[int, int]:
        """SegFormer is fully convolutional: the size comes from its preprocessor (512 x 512 by default)."""
        size = preprocessor.get("size", {"height": 512, "width": 512})
        return int(size.get("height", 512)), int(size.get("width", 512))

    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        problem = self.unsupported(source)
        if problem:
            raise ValueError(f"DynSegformer cannot run this model: {problem}")
        cfg = source.config
        stages = source.segformer.stages
        self.patch_embeds = nn.ModuleList(PatchEmbed(s.patch_embeddings) for s in stages)
        self.blocks = nn.ModuleList(Block(layer, cfg.hidden_act) for s in stages for layer in s.blocks)
        self.norms = nn.ModuleList(s.layer_norm for s in stages)
        self.decoder = Decoder(source.decode_head)
        bounds = [0]
        for s in stages:
            bounds.append(bounds[-1] + len(s.blocks))
        self.stage_blocks = tuple(range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        self.stage_of = tuple(s for s, r in enumerate(self.stage_blocks) for _ in r)
        attn = [b.attn for b in self.blocks]
        self.space = Space(
            family="segformer", num_blocks=len(self.blocks), heads=tuple(a.num_heads for a in attn),
            head_dim=tuple(a.head_dim for a in attn), mlp_hidden=tuple(b.mlp.fc1.out_features for b in self.blocks),
            cls_token=False, decoder_width=self.decoder.width, decoder_branches=self.decoder.num_branches,
            size_multiple=math.prod(cfg.strides), default_resolution=(512, 512), any_resolution=True,
        )
        self.set_plan(self.default_plan())

    def permute(self, perms: Perms) -> None:
        super().permute(perms)
        if "fuse" in perms:
            with torch.no_grad():
                self.decoder.permute(perms["branch"], perms["fuse"][0])

    def begin(self, pixel_values: torch.Tensor) -> tuple:
        x = resize_input(pixel_values.to(self.patch_embeds[0].proj.weight.dtype), self.plan.resolution)
        return x, 0, 0, ()

    def step(self, carry: tuple, i: int) -> tuple:
        s = self.stage_of[i]
        if s > max(self.plan.decoder_branches):
            return carry  # stages after the last kept branch feed nothing: not run
        x, h, w, feats = carry
        if i == self.stage_blocks[s].start:
            x, h, w = self.patch_embeds[s](x if s == 0 else _spatial(*feats[-1]))
        p = self.plan.blocks[i]
        x = self.blocks[i](x, h, w, p) if p.attn or p.mlp else compensate.skipped_block(self.blocks[i], x)
        if i == self.stage_blocks[s].stop - 1:
            feats = (*feats, (self.norms[s](x), h, w))
        return x, h, w, feats

    def end(self, carry: tuple) -> torch.Tensor:
        feats = list(carry[3])
        # channels-last logits -> NCHW-contiguous, as transformers returns them
        return self.decoder(feats, self.plan.decoder_dim, self.plan.decoder_branches).contiguous()

    def prefix_key(self, plan: Plan, depth: int) -> tuple:
        """Blocks of stages no kept branch reads are not run: which stages ran decides the carry too."""
        ran = tuple(s <= max(plan.decoder_branches) for s in sorted(set(self.stage_of[:depth])))
        return plan.resolution, plan.blocks[:depth], ran
