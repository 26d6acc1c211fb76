"""ViT / DeiT (Hugging Face ``ViTForImageClassification``): dynavit's own forward pass.

Same math as transformers' ViT in eval mode (pre-norm blocks, SDPA attention, GELU MLP,
CLS classifier), over the very same parameter tensors, with every knob built in: depth
(blocks and sub-layers), heads, MLP width, tokens (prune / merge / adaptive) and input
resolution (bicubic position-embedding interpolation as transformers does it). The final
LayerNorm runs on the CLS token only: the classifier reads nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.config import BlockPlan, Plan, Space
from dynavit.knobs import tokens
from dynavit.knobs.width import heads_of, merge_heads, mlp
from dynavit.models.base import DerivedCache, FamilyModel, interpolate_grid, resize_input

_ACTS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class Attention(nn.Module):
    def __init__(self, src: nn.Module, num_heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = src.q_proj, src.k_proj, src.v_proj, src.o_proj
        self.num_heads = num_heads
        self.head_dim = self.q.out_features // num_heads

    def forward(self, x: torch.Tensor, heads: int, bias: torch.Tensor | None, token_op: str | None):
        """Attention output, plus what the following token op reads: keys (merge) or CLS attention."""
        q = heads_of(x, self.q, heads, self.head_dim)
        k = heads_of(x, self.k, heads, self.head_dim)
        v = heads_of(x, self.v, heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        extra = None if token_op is None else k if token_op == "merge" else tokens.cls_attention(q, k, bias)
        return merge_heads(out, self.o), extra


class MLP(nn.Module):
    def __init__(self, src: nn.Module, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = src.fc1, src.fc2
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        return mlp(x, self.fc1, self.fc2, hidden, self.act)


class Block(nn.Module):
    def __init__(self, src: nn.Module, num_heads: int, act: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = src.layernorm_before, src.layernorm_after
        self.attn = Attention(src.attention, num_heads)
        self.mlp = MLP(src.mlp, act)

    def forward(self, x: torch.Tensor, p: BlockPlan, plan: Plan, state: tokens.TokenState):
        if p.attn:
            bias = state.attn_bias(x.dtype)
            out, extra = self.attn(self.norm1(x), p.heads, bias, p.token_op)
            x = x + out
            if p.token_op == "prune":
                x = tokens.prune(x, extra, plan.token_keep, plan.token_fuse)
            elif p.token_op == "merge":
                x, state = tokens.merge(x, extra, plan.token_keep, state)
            elif p.token_op == "threshold":
                x, state = tokens.threshold(x, extra, plan.token_threshold, state)
        if p.mlp:
            x = x + self.mlp(self.norm2(x), p.mlp_dim)
        return x, state


class DynViT(FamilyModel):
    family = "vit"

    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        cfg = source.config
        if cfg.model_type != "vit":
            raise ValueError(f"DynViT needs a ViT model, got {cfg.model_type}")
        emb = source.vit.embeddings
        self.patch = emb.patch_embeddings.projection
        self.cls_token, self.pos_embed = emb.cls_token, emb.position_embeddings
        heads, act = cfg.num_attention_heads, cfg.hidden_act
        self.blocks = nn.ModuleList(Block(layer, heads, act) for layer in source.vit.layers)
        self.norm, self.head = source.vit.layernorm, source.classifier
        self.patch_size = int(cfg.patch_size)
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        self.grid = int(size) // self.patch_size
        n = len(self.blocks)
        self.space = Space(
            family="vit", num_blocks=n, heads=(cfg.num_attention_heads,) * n,
            head_dim=(cfg.hidden_size // cfg.num_attention_heads,) * n, mlp_hidden=(cfg.intermediate_size,) * n,
            cls_token=True, size_multiple=self.patch_size, default_resolution=(int(size), int(size)),
        )
        self._pos_cache = DerivedCache()
        self.set_plan(self.default_plan())

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings for a gh x gw patch grid: bicubic interpolation, cached per grid."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        pos = self.pos_embed

        def make() -> torch.Tensor:
            return torch.cat([pos[:, :1], interpolate_grid(pos[:, 1:], (self.grid, self.grid), (gh, gw))], dim=1)

        return self._pos_cache.get(pos, (gh, gw), make)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        x = resize_input(pixel_values.to(self.patch.weight.dtype), plan.resolution)
        x = self.patch(x)  # (B, C, gh, gw)
        b, _, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.position_embedding(gh, gw)
        state = tokens.TokenState()
        for blk, p in zip(self.blocks, plan.blocks, strict=True):
            if p.attn or p.mlp:
                x, state = blk(x, p, plan, state)
        return self.head(self.norm(x[:, 0]))
