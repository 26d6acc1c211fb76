"""Swin Transformer (Hugging Face ``SwinForImageClassification``): dynavit's own forward pass.

Same math as transformers' Swin in eval mode, over the very same parameter tensors: patch
embedding (zero padding to a patch multiple) + LayerNorm (+ absolute position embeddings),
stages of window-attention blocks separated by patch merging, final LayerNorm, average
pooling, classifier. Block ``j`` of a stage attends within ``ws x ws`` windows of the feature
map zero-padded to window multiples, cyclically rolled by ``-ws // 2`` when ``j`` is odd, with
the relative-position bias ``B[h, i, k] = table[idx(i - k), h]`` plus, for rolled windows,
-100 between tokens that come from different regions of the unrolled map. When a stage's map
has ``min(H, W) <= ws`` the window shrinks to ``min(H, W)`` and is not shifted (as transformers
does; a window smaller than the configured one reads its bias from the centre of the table,
where transformers fails with a shape error).

Layout: pad + roll + window partition is ONE gather of token rows, ordered (token in window,
window), so q/k/v view as (B, windows * heads, ws^2, head_dim) and ``scaled_dot_product_attention``
takes the bias+mask as one (1, windows * heads, ws^2, ws^2) tensor that broadcasts over the
batch (fused kernel, nothing per-image materialised). The inverse gather undoes it and crops.
Gather indices, masks and the per-head bias are built once per feature-map size and cached
(the bias keyed also by dtype, device and the table's version counter); under autograd the
bias is gathered in the graph, so the model stays trainable. Knobs: skipped blocks and
sub-layers, the first ``h`` heads (q/k/v rows, output-projection columns, bias columns),
the first ``k`` MLP channels, and input resolution (absolute position embeddings, if any,
interpolated bicubically as transformers' ``interpolate_pos_encoding``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.config import BlockPlan, Space
from dynavit.knobs import compensate
from dynavit.knobs.layers import MLP
from dynavit.knobs.permute import permute_heads, permute_units
from dynavit.knobs.width import linear_in, linear_out, observe, observing
from dynavit.models.base import DerivedCache, FamilyModel, interpolate_grid, resize_input


@dataclass(frozen=True, eq=False)
class Windows:
    """Window geometry of one (feature map, shifted?) pair: the gathers and the shift mask."""

    key: tuple[int, int, int, int]  # (windows down, windows across, window size, shift)
    size: int  # window side ws; a window holds n = ws * ws tokens
    num: int  # windows per image
    gather: torch.Tensor  # (n * num,) source row of token (t, w) at t * num + w; L = the zero pad row
    scatter: torch.Tensor  # (L,) where each map token sits in the gathered order
    pad: bool  # whether any gathered row is padding
    mask: torch.Tensor | None  # (num, n, n) float32 shift mask (0 / -100), None when not shifted


def build_windows(h: int, w: int, window: int, shifted: bool, device: torch.device) -> Windows:
    """Geometry of transformers' pad -> roll -> window_partition, as index arithmetic."""
    ws, shift = window, (window // 2 if shifted else 0)
    if min(h, w) <= ws:
        ws, shift = min(h, w), 0
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    nh, nw = hp // ws, wp // ws
    rows, cols = torch.arange(hp, device=device), torch.arange(wp, device=device)
    src = torch.where((rows < h)[:, None] & (cols < w)[None], rows[:, None] * w + cols[None], h * w)
    src = torch.roll(src, (-shift, -shift), (0, 1))  # rolled[i, j] = padded[i + shift, j + shift]
    gather = src.view(nh, ws, nw, ws).permute(1, 3, 0, 2).reshape(-1)
    valid = gather < h * w
    scatter = torch.empty(h * w, dtype=torch.long, device=device)
    scatter[gather[valid]] = torch.arange(gather.numel(), device=device)[valid]
    mask = None
    if shift:
        def region(extent: int, idx: torch.Tensor) -> torch.Tensor:  # 0, 1, 2: transformers' three slices
            return (idx >= extent - ws).long() + (idx >= extent - shift).long()

        ids = (region(hp, rows)[:, None] * 3 + region(wp, cols)[None]).view(nh, ws, nw, ws)
        ids = ids.permute(0, 2, 1, 3).reshape(nh * nw, ws * ws)
        mask = torch.zeros(ids.shape + (ws * ws,), device=device)
        mask.masked_fill_(ids[:, :, None] != ids[:, None, :], -100.0)
    return Windows((nh, nw, ws, shift), ws, nh * nw, gather, scatter, not bool(valid.all()), mask)


def relative_index(ws: int, table_window: int, device: torch.device) -> torch.Tensor:
    """(ws^2 * ws^2,) rows of a (2W-1)^2 bias table for a ws x ws window (W = table_window >= ws)."""
    r = torch.arange(ws, device=device)
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)  # (2, n)
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)
    return (rel[0] * (2 * table_window - 1) + rel[1]).reshape(-1)


class Attention(nn.Module):
    def __init__(self, src: nn.Module, num_heads: int, window: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = src.q_proj, src.k_proj, src.v_proj, src.o_proj
        self.rel_bias_table = src.relative_position_bias.relative_position_bias_table  # ((2W-1)^2, heads)
        self.num_heads = num_heads
        self.head_dim = self.q.out_features // num_heads
        self.window = window
        self._bias_cache = DerivedCache()

    def forward(self, x: torch.Tensor, heads: int, win: Windows, precision: str = "fp32") -> torch.Tensor:
        """(B, L, C) normed tokens -> (B, L, C) window attention output of the first ``heads`` heads."""
        b, n, hd = x.shape[0], win.size * win.size, heads * self.head_dim
        if win.pad:
            x = F.pad(x, (0, 0, 0, 1))  # row L: the zero token transformers pads the map with
        x = x.index_select(1, win.gather)  # (B, n * windows, C)

        def project(lin: nn.Linear) -> torch.Tensor:
            y = linear_out(x, lin, hd, precision=precision)
            return y.view(b, n, win.num * heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(project(self.q), project(self.k), project(self.v),
                                             attn_mask=self.bias(win, heads, x.dtype))
        if observing():  # calibration ranks heads by their outputs; the copy is paid only then
            per_head = out.reshape(b * win.num, heads, n, self.head_dim)
            observe(self.o, per_head)
            out = per_head.view(b, win.num * heads, n, self.head_dim)
        out = linear_in(out.transpose(1, 2).reshape(b, -1, hd), self.o, hd, precision)
        return out.index_select(1, win.scatter)

    def bias(self, win: Windows, heads: int, dtype: torch.dtype) -> torch.Tensor:
        """Relative-position bias (+ shift mask) as (1, windows * heads, n, n)."""
        full = self._bias_cache.get(self.rel_bias_table, (win.key, dtype), lambda: self._full_bias(win, dtype))
        n = win.size * win.size
        if heads < self.num_heads:
            full = full[:, :heads]
        return full.reshape(1, win.num * heads, n, n)

    def _full_bias(self, win: Windows, dtype: torch.dtype) -> torch.Tensor:
        n = win.size * win.size
        idx = relative_index(win.size, self.window, self.rel_bias_table.device)
        bias = self.rel_bias_table[idx].view(n, n, -1).permute(2, 0, 1)  # (heads, n, n)
        full = bias.expand(win.num, -1, -1, -1) if win.mask is None else bias + win.mask.to(bias.dtype)[:, None]
        return full.to(dtype).contiguous()  # (windows, heads, n, n)


class Block(nn.Module):
    def __init__(self, src: nn.Module, num_heads: int, window: int, act: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = src.layernorm_before, src.layernorm_after
        self.attn = Attention(src.attention, num_heads, window)
        self.mlp = MLP(src.mlp, act)

    def forward(self, x: torch.Tensor, p: BlockPlan, win: Windows | None) -> torch.Tensor:
        # ``x`` is never written (a sweep may keep it); the MLP's residual add goes in place
        # into the attention's fresh sum when no autograd records (no second activation buffer)
        owned = False
        if p.attn:
            out = self.attn(self.norm1(x), p.heads, win, p.precision)
            observe(self.attn, out)  # calibration records the sub-layer's mean output (compensation)
            x = x + out
            owned = not torch.is_grad_enabled()
        else:
            x = compensate.skipped(self.attn, x)
        if p.mlp:
            out = self.mlp(self.norm2(x), p.mlp_dim, p.precision)
            observe(self.mlp, out)
            x = x.add_(out) if owned else x + out
        else:
            x = compensate.skipped(self.mlp, x)
        return x

    def permute(self, mlp_perm: torch.Tensor, head_perm: torch.Tensor) -> None:
        a = self.attn
        permute_units(mlp_perm, (self.mlp.fc1,), self.mlp.fc2)
        permute_heads(head_perm, ((a.q, 0), (a.k, 0), (a.v, 0)), a.o, a.head_dim,
                      per_head=((a.rel_bias_table, 1),))  # the bias table is (positions, heads)


class Merge(nn.Module):
    """Patch merging: 2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, 4C -> 2C."""

    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.norm, self.reduction = src.norm, src.reduction

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = x.view(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class DynSwin(FamilyModel):
    """Blocks across stages by global index; the carry between block steps is (tokens, h, w)."""

    family = "swin"
    steps = True

    @classmethod
    def unsupported(cls, source: nn.Module) -> str:
        model_type = getattr(getattr(source, "config", None), "model_type", "")
        if model_type != "swin":
            return f"{type(source).__name__} is not a Swin model"
        return "" if hasattr(source, "classifier") else "a Swin without a classifier (backbone only)"

    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        problem = self.unsupported(source)
        if problem:
            raise ValueError(f"DynSwin cannot run this model: {problem}")
        cfg = source.config
        emb = source.swin.embeddings
        self.patch, self.embed_norm = emb.patch_embeddings.projection, emb.norm
        self.pos_embed = emb.position_embeddings  # None unless use_absolute_embeddings
        stages = source.swin.encoder.layers
        self.window = int(cfg.window_size)
        self.depths = tuple(len(stage.blocks) for stage in stages)
        self.blocks = nn.ModuleList(
            Block(layer, int(cfg.num_heads[s]), self.window, cfg.hidden_act)
            for s, stage in enumerate(stages) for layer in stage.blocks
        )
        self.merges = nn.ModuleList(Merge(stage.downsample) for stage in stages if stage.downsample is not None)
        self.norm, self.head = source.swin.layernorm, source.classifier
        ps = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        size = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
        self.patch_size = int(ps)
        self.grid = (int(size[0]) // self.patch_size, int(size[1]) // self.patch_size)
        attns = [blk.attn for blk in self.blocks]
        self.space = Space(
            family="swin", num_blocks=len(self.blocks), heads=tuple(a.num_heads for a in attns),
            head_dim=tuple(a.head_dim for a in attns),
            mlp_hidden=tuple(blk.mlp.fc1.out_features for blk in self.blocks),
            cls_token=False, decoder_width=0, size_multiple=self.patch_size * 2 ** (len(self.depths) - 1),
            default_resolution=(int(size[0]), int(size[1])),
        )
        self.stage_of = tuple(s for s, d in enumerate(self.depths) for _ in range(d))
        self.shifted = tuple(j % 2 == 1 for d in self.depths for j in range(d))  # odd blocks of a stage roll
        self.stage_ends = tuple(sum(self.depths[: s + 1]) - 1 for s in range(len(self.depths)))
        self._windows: dict[tuple, Windows] = {}
        self._pos_cache = DerivedCache()
        self.set_plan(self.default_plan())

    def windows(self, h: int, w: int, shifted: bool, device: torch.device) -> Windows:
        """Window geometry for an h x w map, built once per (size, shift, device)."""
        key = (h, w, shifted, device)
        win = self._windows.get(key)
        if win is None:
            with torch.inference_mode(False):  # normal tensors: a later training forward saves them
                win = self._windows[key] = build_windows(h, w, self.window, shifted, device)
        return win

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Absolute position embeddings for a gh x gw grid: bicubic interpolation, cached per grid."""
        if (gh, gw) == self.grid:
            return self.pos_embed
        pos = self.pos_embed
        return self._pos_cache.get(pos, (gh, gw), lambda: interpolate_grid(pos, self.grid, (gh, gw)))

    def begin(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = resize_input(pixel_values.to(self.patch.weight.dtype), self.plan.resolution)
        p = self.patch_size
        ph, pw = -x.shape[-2] % p, -x.shape[-1] % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = self.patch(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        if self.pos_embed is not None:
            x = x + self.position_embedding(h, w)
        return x, h, w

    def step(self, carry: tuple[torch.Tensor, int, int], i: int) -> tuple[torch.Tensor, int, int]:
        x, h, w = carry
        bp = self.plan.blocks[i]
        if bp.attn or bp.mlp:
            win = self.windows(h, w, self.shifted[i], x.device) if bp.attn else None
            x = self.blocks[i](x, bp, win)
        else:
            x = compensate.skipped_block(self.blocks[i], x)
        s = self.stage_of[i]
        if i == self.stage_ends[s] and s < len(self.merges):  # patch merging closes every stage but the last
            x = self.merges[s](x, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
        return x, h, w

    def end(self, carry: tuple[torch.Tensor, int, int]) -> torch.Tensor:
        return self.head(self.norm(carry[0]).mean(1))
