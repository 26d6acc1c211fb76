"""The timm ViT path of DynViT, against a stand-in (timm itself does not import on this machine).

The stand-in has timm's attribute names and reproduces ``timm.models.vision_transformer``'s
eval forward for a plain ViT (fused qkv, optional LayerScale, CLS pooling). It is loaded
with DeiT-tiny's real weights converted to timm's layout, so the check is two-sided: the
timm path must equal both the stand-in's own forward and transformers' DeiT-tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

from dynavit.config import ConfigError, ExecConfig
from dynavit.model import DynamicModel
from dynavit.models.hub import Source


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = self.k_norm = self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # timm's Attention.forward, eval, fused path
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(self.norm(out.transpose(1, 2).reshape(b, n, c)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Block(nn.Module):  # the name timm_unsupported() checks
    def __init__(self, dim: int, heads: int, hidden: int, layer_scale: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, hidden)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, dim, patch, stride=patch), nn.Identity()


class VisionTransformer(nn.Module):
    def __init__(self, dim=192, depth=12, heads=3, hidden=768, patch=16, grid=14, classes=1000, layer_scale=False):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden, layer_scale) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)
        self.norm_pre = self.fc_norm = nn.Identity()
        self.global_pool, self.num_reg_tokens, self.no_embed_class = "token", 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.norm_pre(x)))
        return self.head(self.fc_norm(x[:, 0]))


def timm_from_hf(hf) -> VisionTransformer:
    """DeiT-tiny's transformers weights in timm's layout (q, k, v stacked into one qkv)."""
    vt = VisionTransformer().eval()
    with torch.no_grad():
        emb = hf.vit.embeddings
        vt.patch_embed.proj.load_state_dict(emb.patch_embeddings.projection.state_dict())
        vt.cls_token.copy_(emb.cls_token)
        vt.pos_embed.copy_(emb.position_embeddings)
        for b, layer in zip(vt.blocks, hf.vit.layers, strict=True):
            a = layer.attention
            b.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            b.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            b.attn.proj.load_state_dict(a.o_proj.state_dict())
            b.norm1.load_state_dict(layer.layernorm_before.state_dict())
            b.norm2.load_state_dict(layer.layernorm_after.state_dict())
            b.mlp.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            b.mlp.fc2.load_state_dict(layer.mlp.fc2.state_dict())
        vt.norm.load_state_dict(hf.vit.layernorm.state_dict())
        vt.head.load_state_dict(hf.classifier.state_dict())
    return vt


def wrap(vt: nn.Module) -> DynamicModel:
    return DynamicModel(Source(module=vt, name="timm:stand-in", family="timm", task="classification",
                               id2label={i: str(i) for i in range(1000)}, input_size=(224, 224)))


@pytest.fixture(scope="module")
def pair(deit_tiny):
    vt = timm_from_hf(deit_tiny.reference)
    return deit_tiny, wrap(vt), vt


def test_timm_layout_reproduces_both_sources(pair):
    hf_dm, timm_dm, vt = pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = timm_dm(x)
        assert rel_err(ours, vt(x)) <= 1e-5
        assert rel_err(ours, hf_dm.reference(pixel_values=x).logits) <= 1e-5
    assert {p.data_ptr() for p in timm_dm.module.parameters()} <= {p.data_ptr() for p in vt.parameters()}


@pytest.mark.parametrize("cfg", [ExecConfig(heads=2, mlp_width=0.5), ExecConfig(token_keep=0.7),
                                 ExecConfig(token_keep=0.8, token_method="merge", token_layers=(2, 5)),
                                 ExecConfig(skip_attn=(4,), resolution=160)])
def test_knobs_agree_across_layouts(pair, cfg):
    """Fused qkv must slice q, k and v heads at their own offsets: same result as separate projections."""
    hf_dm, timm_dm, _ = pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a = hf_dm.configure(cfg)(x)
        b = timm_dm.configure(cfg)(x)
    hf_dm.configure(ExecConfig())
    timm_dm.configure(ExecConfig())
    assert rel_err(b, a) <= 1e-5


def test_layer_scale_and_calibration_on_fused_qkv():
    torch.manual_seed(0)
    vt = VisionTransformer(dim=64, depth=2, heads=4, hidden=128, patch=8, grid=4, classes=10, layer_scale=True).eval()
    dm = DynamicModel(Source(module=vt, name="timm:stand-in", family="timm", task="classification",
                             id2label={i: str(i) for i in range(10)}, input_size=(32, 32)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(dm(x), vt(x)) <= 1e-5
    dm.calibrate(torch.randn(8, 3, 32, 32), criterion="magnitude", batch_size=4)
    with torch.no_grad():
        assert rel_err(dm(x), vt(x)) <= 1e-5  # vt shares the reordered tensors: same function


def test_unsupported_timm_models_stay_plain():
    vt = VisionTransformer(dim=32, depth=1, heads=2, hidden=64, patch=8, grid=2, classes=3)
    vt.num_reg_tokens = 4
    dm = wrap(vt)
    assert not dm.dynamic
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dm(x), vt(x))  # runs as it is, default path only
    with pytest.raises(ConfigError, match="skip_blocks"):
        dm.configure(ExecConfig(skip_blocks=(0,)))
