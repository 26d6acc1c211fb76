"""ViT / DeiT (transformers ``ViTForImageClassification`` or a plain timm ``VisionTransformer``).

Same math as the source in eval mode (pre-norm blocks, SDPA attention, GELU MLP, optional
LayerScale, CLS classifier), over the very same parameter tensors, with every knob built in: depth
(blocks and sub-layers), heads, MLP width, tokens (prune / merge / prune+merge / adaptive) and input
resolution (bicubic position-embedding interpolation as transformers does it). The final
LayerNorm runs on the CLS token only: the classifier reads nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.config import BlockPlan, Plan, Space
from dynavit.knobs import compensate, tokens
from dynavit.knobs.focus import focused_mlp, fraction
from dynavit.knobs.layers import MLP
from dynavit.knobs.permute import permute_heads, permute_units
from dynavit.knobs.width import heads_of, merge_heads, observe
from dynavit.models.base import DerivedCache, FamilyModel, interpolate_grid, resize_input

SCORED = ("prune", "prune+merge", "threshold")  # token ops that read the CLS token's attention


class Attention(nn.Module):
    """Separate q/k/v projections (transformers) or one fused ``qkv`` (timm: q, k, v at row offsets 0, C, 2C)."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, num_heads: int) -> None:
        super().__init__()
        self.fused = q is k
        if self.fused:
            self.qkv = q
        else:
            self.q, self.k, self.v = q, k, v
        self.o = o
        self.num_heads = num_heads
        self.head_dim = o.in_features // num_heads
        self.record: list[torch.Tensor] | None = None  # CLS attention of each call, while recording

    def qkv_parts(self) -> list[tuple[nn.Linear, int]]:
        """(projection, row offset) of q, k and v: what calibration permutes per head."""
        if self.fused:
            c = self.o.in_features
            return [(self.qkv, 0), (self.qkv, c), (self.qkv, 2 * c)]
        return [(self.q, 0), (self.k, 0), (self.v, 0)]

    def forward(self, x: torch.Tensor, heads: int, bias: torch.Tensor | None, token_op: str | None,
                precision: str = "fp32", cls_attention: bool = False):
        """Attention output, plus what the following token op reads: (CLS attention, keys), each or None.

        Pruning and thresholding read the CLS attention, merging the keys, "prune+merge" both;
        ``cls_attention``: return the CLS attention anyway (a focused MLP reads it, ``knobs.focus``).
        """
        q, k, v = (heads_of(x, lin, heads, self.head_dim, off, precision) for lin, off in self.qkv_parts())
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        scores, keys = _cues(q, k, bias, token_op)
        if cls_attention and scores is None:
            scores = tokens.cls_attention(q, k, bias)
        if self.record is not None:
            self.record.append(scores if scores is not None else tokens.cls_attention(q, k, bias))
        return merge_heads(out, self.o, precision), (scores, keys)

    def cues(self, x: torch.Tensor, heads: int, bias: torch.Tensor | None, token_op: str,
             precision: str = "fp32") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What ``token_op`` reads, without the attention itself: the keys, and the CLS query for its attention.

        A block a deadline drops still reduces its tokens from these (``skip_keep_tokens``): about a
        twelfth of a ViT block's MACs, and every later block keeps the token count it was timed with.
        """
        (lq, oq), (lk, ok), _ = self.qkv_parts()
        k = heads_of(x, lk, heads, self.head_dim, ok, precision)
        q = heads_of(x[:, :1], lq, heads, self.head_dim, oq, precision) if token_op in SCORED else None
        return _cues(q, k, bias, token_op)


def _cues(q: torch.Tensor | None, k: torch.Tensor, bias: torch.Tensor | None,
          token_op: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(CLS attention, keys), each or None: pruning and thresholding read the first, merging the second."""
    scores = tokens.cls_attention(q, k, bias) if token_op in SCORED else None
    return scores, k if token_op and "merge" in token_op else None


class Block(nn.Module):
    def __init__(self, src: nn.Module, num_heads: int, act: str | None = None) -> None:
        super().__init__()
        if hasattr(src, "layernorm_before"):  # transformers ViTLayer
            self.norm1, self.norm2 = src.layernorm_before, src.layernorm_after
            a = src.attention
            self.attn = Attention(a.q_proj, a.k_proj, a.v_proj, a.o_proj, num_heads)
            self.mlp = MLP(src.mlp, act)
            self.ls1 = self.ls2 = None
        else:  # timm Block: fused qkv, optional LayerScale (``ls1``/``ls2``: x * gamma)
            self.norm1, self.norm2 = src.norm1, src.norm2
            self.attn = Attention(src.attn.qkv, src.attn.qkv, src.attn.qkv, src.attn.proj, num_heads)
            self.mlp = MLP(src.mlp, src.mlp.act)
            self.ls1, self.ls2 = _layer_scale(src.ls1), _layer_scale(src.ls2)

    def forward(self, x: torch.Tensor, p: BlockPlan, plan: Plan, state: tokens.TokenState):
        focus = self.focus_of(p)
        scores = None
        if p.attn:
            bias = state.attn_bias(x.dtype)
            out, (scores, keys) = self.attn(self.norm1(x), p.heads, bias, p.token_op, p.precision, focus is not None)
            out = out if self.ls1 is None else out * self.ls1
            observe(self.attn, out)  # calibration records the sub-layer's mean output (compensation)
            x = x + out
            if p.token_op:
                x, state = _reduce(x, scores, keys, p, plan, state)
        else:
            x = compensate.skipped(self.attn, x)
        if p.mlp:
            if focus is not None and scores is not None:
                out = focused_mlp(self.norm2(x), self.mlp.fc1, self.mlp.fc2, p.mlp_dim, self.mlp.act, scores, focus,
                                  p.precision)
            else:
                out = self.mlp(self.norm2(x), p.mlp_dim, p.precision)
            out = out if self.ls2 is None else out * self.ls2
            observe(self.mlp, out)
            x = x + out
        else:
            x = compensate.skipped(self.mlp, x)
        return x, state

    def focus_of(self, p: BlockPlan) -> float | None:
        """The calibrated focus fraction when this block's narrowed MLP can use it: its own attention ran and
        kept every token (after a token op the scores no longer match the tokens)."""
        if not (p.attn and p.mlp and not p.token_op and p.mlp_dim < self.mlp.fc1.out_features):
            return None
        table = compensate.focus(self.mlp)
        return None if table is None else fraction(table, p.mlp_dim / self.mlp.fc1.out_features)

    def thin(self, x: torch.Tensor, p: BlockPlan, plan: Plan, state: tokens.TokenState):
        """The block skipped but for its token reduction (``skip_keep_tokens``), its cues from its input."""
        out = compensate.skipped_block(self, x)
        if not p.token_op:
            return out, state
        scores, keys = self.attn.cues(self.norm1(x), p.heads, state.attn_bias(x.dtype), p.token_op, p.precision)
        return _reduce(out, scores, keys, p, plan, state)

    def permute(self, mlp_perm: torch.Tensor, head_perm: torch.Tensor) -> None:
        permute_units(mlp_perm, (self.mlp.fc1,), self.mlp.fc2)
        permute_heads(head_perm, self.attn.qkv_parts(), self.attn.o, self.attn.head_dim)


def _reduce(x: torch.Tensor, scores: torch.Tensor | None, keys: torch.Tensor | None, p: BlockPlan, plan: Plan,
            state: tokens.TokenState) -> tuple[torch.Tensor, tokens.TokenState]:
    """Block ``p``'s token op on ``x``, from the cues its attention (or ``Attention.cues``) gave."""
    if p.token_op == "threshold":
        return tokens.threshold(x, scores, plan.token_threshold, state)
    if p.token_op == "merge-similar":
        return tokens.merge_similar(x, keys, p.similarity, state)
    counts = tokens.removal(x.shape[1] - 1, p.token_op, plan.token_keep, plan.token_r)
    return tokens.reduce(x, p.token_op, scores, keys, counts, plan.token_fuse, state)


def _layer_scale(m: nn.Module) -> torch.Tensor | None:
    return getattr(m, "gamma", None)


def timm_unsupported(model: nn.Module) -> str:
    """Why a timm model is not the plain CLS-token ViT DynViT reproduces ("" when it is)."""
    identity = nn.Identity
    checks = {
        "not a VisionTransformer": hasattr(model, "blocks") and hasattr(model, "patch_embed"),
        "no class token": getattr(model, "cls_token", None) is not None,
        "distillation token": getattr(model, "dist_token", None) is None,
        "register tokens": getattr(model, "num_reg_tokens", 0) == 0,
        "position embeddings without the class token": not getattr(model, "no_embed_class", False),
        "pooling other than the class token": getattr(model, "global_pool", "token") == "token",
        "pre-norm or fc-norm": isinstance(getattr(model, "norm_pre", identity()), identity)
        and isinstance(getattr(model, "fc_norm", identity()), identity),
    }
    for why, ok in checks.items():
        if not ok:
            return why
    for b in model.blocks:
        a = b.attn
        if type(b).__name__ != "Block" or not hasattr(a, "qkv"):
            return f"block type {type(b).__name__}"
        if not all(isinstance(getattr(a, n, identity()), identity) for n in ("q_norm", "k_norm", "norm")):
            return "qk-norm or attention scale-norm"
        if not isinstance(getattr(b.mlp, "norm", identity()), identity):
            return "MLP scale-norm"
    return ""


class DynViT(FamilyModel):
    family = "vit"
    steps = True
    supports_deadline = True

    @classmethod
    def unsupported(cls, source: nn.Module) -> str:
        if hasattr(source, "vit"):
            model_type = getattr(source.config, "model_type", "")
            return "" if model_type == "vit" else f"transformers model type {model_type!r} is not a plain ViT"
        return timm_unsupported(source)

    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        if hasattr(source, "vit"):  # transformers ViTForImageClassification
            cfg = source.config
            if cfg.model_type != "vit":
                raise ValueError(f"DynViT needs a ViT model, got {cfg.model_type}")
            emb = source.vit.embeddings
            self.patch = emb.patch_embeddings.projection
            self.cls_token, self.pos_embed = emb.cls_token, emb.position_embeddings
            heads = cfg.num_attention_heads
            self.blocks = nn.ModuleList(Block(layer, heads, cfg.hidden_act) for layer in source.vit.layers)
            self.norm, self.head = source.vit.layernorm, source.classifier
        else:
            problem = timm_unsupported(source)
            if problem:
                raise ValueError(f"DynViT cannot run this timm model: {problem}")
            self.patch = source.patch_embed.proj
            self.cls_token, self.pos_embed = source.cls_token, source.pos_embed
            heads = source.blocks[0].attn.num_heads
            self.blocks = nn.ModuleList(Block(b, heads) for b in source.blocks)
            self.norm, self.head = source.norm, source.head
        self.patch_size = int(self.patch.stride[0])
        self.grid = math.isqrt(self.pos_embed.shape[1] - 1)  # position embeddings: CLS + grid x grid
        n = len(self.blocks)
        first = self.blocks[0]
        self.space = Space(
            family="vit", num_blocks=n, heads=(heads,) * n, head_dim=(first.attn.head_dim,) * n,
            mlp_hidden=(first.mlp.fc1.out_features,) * n, cls_token=True, size_multiple=self.patch_size,
            default_resolution=(self.grid * self.patch_size,) * 2,
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

    # The forward in stages, so that a sweep can keep the activations after block k and run
    # only the rest for the next config that executes the same first k blocks.
    def begin(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tokens.TokenState]:
        x = resize_input(pixel_values.to(self.patch.weight.dtype), self.plan.resolution)
        x = self.patch(x)  # (B, C, gh, gw)
        b, _, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return x + self.position_embedding(gh, gw), tokens.TokenState()

    def step(self, carry: tuple[torch.Tensor, tokens.TokenState], i: int) -> tuple[torch.Tensor, tokens.TokenState]:
        p = self.plan.blocks[i]
        if p.attn or p.mlp:
            return self.blocks[i](*carry[:1], p, self.plan, carry[1])
        return self.blocks[i].thin(carry[0], p, self.plan, carry[1])

    def drop(self, carry: tuple[torch.Tensor, tokens.TokenState], i: int) -> tuple[torch.Tensor, tokens.TokenState]:
        """Block ``i`` dropped by a deadline: as ``skip_keep_tokens`` runs it (``deadline.with_dropped``)."""
        return self.blocks[i].thin(carry[0], self.plan.blocks[i], self.plan, carry[1])

    def end(self, carry: tuple[torch.Tensor, tokens.TokenState]) -> torch.Tensor:
        return self.head(self.norm(carry[0][:, 0]))

    def prefix_key(self, plan: Plan, depth: int) -> tuple:
        """Everything that decides the activations after ``depth`` blocks under ``plan``."""
        blocks = plan.blocks[:depth]
        token = (plan.token_keep, plan.token_r, plan.token_fuse, plan.token_threshold) \
            if any(b.token_op for b in blocks) else None
        return plan.resolution, blocks, token
