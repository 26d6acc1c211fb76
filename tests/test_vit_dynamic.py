"""ViT/DeiT execution paths: exactness of the default path, and every knob against an independent reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ours, ref_logits, rel_err, vit_macs
from transformers import ViTConfig

import dynavit
from dynavit.config import ConfigError, ExecConfig, default_token_layers, keep_count
from dynavit.cost import total_macs
from dynavit.knobs import tokens
from dynavit.models.base import resize_input

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=64,
             patch_size=16, num_labels=10)


@pytest.fixture()
def small():
    return dynavit.from_config(ViTConfig(**SMALL))


def test_default_path_bit_for_bit_deit_tiny(deit_tiny):
    x = deit_tiny.example_input(2)
    assert torch.equal(ours(deit_tiny, x), ref_logits(deit_tiny.reference, x))
    x8 = deit_tiny.example_input(8)  # another batch size takes other kernels: still the same bits
    assert torch.equal(ours(deit_tiny, x8), ref_logits(deit_tiny.reference, x8))
    refs = {p.data_ptr() for p in deit_tiny.reference.parameters()}
    assert {p.data_ptr() for p in deit_tiny.module.parameters()} == refs


def test_default_path_vit_b16_and_other_resolution():
    dm = dynavit.from_config(ViTConfig())
    x = dm.example_input(1)
    assert rel_err(ours(dm, x), ref_logits(dm.reference, x)) <= 1e-5
    x2 = torch.randn(1, 3, 160, 192)
    assert rel_err(ours(dm, x2), ref_logits(dm.reference, x2, interpolate_pos_encoding=True)) <= 1e-5


def test_skip_blocks_equals_source_without_those_blocks(small):
    x = torch.randn(2, 3, 64, 64)
    hf = copy.deepcopy(small.reference)
    del hf.vit.layers[2]
    del hf.vit.layers[0]
    cfg = ExecConfig(skip_blocks=(0, 2))
    assert rel_err(ours(small, x, cfg), ref_logits(hf, x)) <= 1e-5
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 64, 64)


class Zero(torch.nn.Module):
    def forward(self, h, *a, **k):
        z = torch.zeros_like(h)
        return (z, None) if a or k else z


def test_skip_attn_and_mlp(small):
    x = torch.randn(2, 3, 64, 64)
    hf = copy.deepcopy(small.reference)
    hf.vit.layers[1].attention = Zero()
    hf.vit.layers[3].mlp = Zero()
    cfg = ExecConfig(skip_attn=(1,), skip_mlp=(3,))
    assert rel_err(ours(small, x, cfg), ref_logits(hf, x)) <= 1e-5
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 64, 64)


@pytest.mark.parametrize("tok", [dict(token_keep=0.7), dict(token_method="merge", token_r=3),
                                 dict(token_method="prune+merge", token_keep=0.6),
                                 dict(token_method="merge", token_threshold=0.1)])
def test_skip_keep_tokens_is_the_block_with_zero_output_that_still_reduces(small, tok):
    """A dropped token block (a deadline's drop) = the block with its attention and MLP outputs zeroed."""
    x = torch.randn(2, 3, 64, 64)
    cfg = ExecConfig(token_layers=(1, 2), **tok)
    zeroed = dynavit.from_config(ViTConfig(**SMALL))
    zeroed.module.load_state_dict(small.module.state_dict())
    for lin in (zeroed.module.blocks[1].attn.o, zeroed.module.blocks[1].mlp.fc2):
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    thin = ours(small, x, cfg.replace(skip_keep_tokens=(1,)))
    assert rel_err(thin, ours(zeroed, x, cfg)) <= 1e-5
    assert rel_err(thin, ours(small, x, cfg.replace(skip_blocks=(1,)))) > 1e-3  # skipping loses the reduction
    plain = ExecConfig(mlp_width=0.5)  # without a token op it is ``skip_blocks``
    assert torch.equal(ours(small, x, plain.replace(skip_keep_tokens=(0, 2))), ours(small, x, plain.replace(
        skip_blocks=(0, 2))))
    with pytest.raises(ConfigError, match="skip_keep_tokens contains block 9"):
        small.configure(ExecConfig(skip_keep_tokens=(9,)))
    assert ExecConfig.from_json(cfg.replace(skip_keep_tokens=[2, 1]).to_json()).skip_keep_tokens == (1, 2)

def test_heads_equal_zeroed_heads(small):
    x = torch.randn(2, 3, 64, 64)
    hf = copy.deepcopy(small.reference)
    hd = 16
    with torch.no_grad():
        for layer in hf.vit.layers:
            a = layer.attention
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                lin.weight[2 * hd:] = 0
                lin.bias[2 * hd:] = 0
            a.o_proj.weight[:, 2 * hd:] = 0
    cfg = ExecConfig(heads=2)
    assert rel_err(ours(small, x, cfg), ref_logits(hf, x)) <= 1e-5
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 64, 64)
    per_block = ExecConfig(heads=(4, 3, 2, 1))
    ours(small, x, per_block)
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, per_block, 64, 64)


@pytest.mark.parametrize("width,gran", [(0.5, 1), (0.3, 32), ((1.0, 0.25, 0.5, 0.75), 1)])
def test_mlp_width_equals_zeroed_channels(small, width, gran):
    x = torch.randn(2, 3, 64, 64)
    cfg = ExecConfig(mlp_width=width, granularity=gran)
    out = ours(small, x, cfg)
    hf = copy.deepcopy(small.reference)
    with torch.no_grad():
        for layer, bp in zip(hf.vit.layers, small.module.plan.blocks, strict=True):
            k = bp.mlp_dim
            assert k % gran == 0 or k == 256
            layer.mlp.fc1.weight[k:] = 0
            layer.mlp.fc1.bias[k:] = 0
            layer.mlp.fc2.weight[:, k:] = 0
    assert rel_err(out, ref_logits(hf, x)) <= 1e-5
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 64, 64)


def test_keep_count_rounding():
    assert keep_count(256, 0.3, 32) == 96 and keep_count(256, 0.3, 1) == 77
    assert keep_count(100, 0.01, 32) == 32 and keep_count(20, 1.0, 32) == 20


def test_resolution_equals_source_on_resized_input(small):
    x = torch.randn(2, 3, 64, 64)
    cfg = ExecConfig(resolution=(48, 32))
    ref = ref_logits(small.reference, resize_input(x, (48, 32)), interpolate_pos_encoding=True)
    assert rel_err(ours(small, x, cfg), ref) <= 1e-5
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 48, 32)


def reference_prune(hf, x, layers, keep, fuse) -> torch.Tensor:
    """EViT written independently with the source model's own modules and explicit attention."""
    vit = hf.vit
    h = vit.embeddings(x)
    for i, layer in enumerate(vit.layers):
        y = layer.layernorm_before(h)
        att = layer.attention
        b, n, _ = y.shape
        nh = hf.config.num_attention_heads
        hd = y.shape[-1] // nh
        q = att.q_proj(y).view(b, n, nh, hd).transpose(1, 2)
        k = att.k_proj(y).view(b, n, nh, hd).transpose(1, 2)
        v = att.v_proj(y).view(b, n, nh, hd).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        h = h + att.o_proj(out)
        if i in layers:
            cls_attn = probs[:, :, 0, 1:].mean(1)
            m = math.ceil(keep * (n - 1) - 1e-9)
            order = cls_attn.argsort(dim=1, descending=True)
            keep_idx, drop_idx = order[:, :m], order[:, m:]
            pt = h[:, 1:]
            kept = torch.stack([pt[j, keep_idx[j]] for j in range(b)])
            parts = [h[:, :1], kept]
            if fuse:
                wts = torch.stack([cls_attn[j, drop_idx[j]] for j in range(b)])
                wts = wts / wts.sum(1, keepdim=True)
                dropped = torch.stack([pt[j, drop_idx[j]] for j in range(b)])
                parts.append((wts.unsqueeze(-1) * dropped).sum(1, keepdim=True))
            h = torch.cat(parts, 1)
        h = h + layer.mlp(layer.layernorm_after(h))
    return hf.classifier(vit.layernorm(h)[:, 0])


@pytest.mark.parametrize("fuse", [False, True])
def test_prune_matches_independent_evit(small, fuse):
    x = torch.randn(3, 3, 64, 64)
    cfg = ExecConfig(token_keep=0.5, token_layers=(1, 2), token_fuse=fuse)
    with torch.no_grad():
        ref = reference_prune(small.reference, x, {1, 2}, 0.5, fuse)
    assert rel_err(ours(small, x, cfg), ref) <= 1e-5
    # 16 patches -> 8 -> 4 (+1 fused each time)
    f = int(fuse)
    t1 = 1 + 8 + f  # after block 1
    t2 = 1 + math.ceil(0.5 * (t1 - 1)) + f  # after block 2
    counts = [17, t1, t2, t2]
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 64, 64, counts)


def test_token_keep_one_is_the_dense_path(small):
    x = torch.randn(2, 3, 64, 64)
    dense = ours(small, x)
    assert torch.equal(ours(small, x, ExecConfig(token_keep=1.0, token_layers=(1, 2))), dense)


def test_merge_preserves_mass_and_cls():
    torch.manual_seed(0)
    x = torch.randn(2, 17, 8)
    k = torch.randn(2, 2, 17, 4)
    out, st = tokens.merge(x, k, 8, tokens.TokenState())
    assert out.shape == (2, 9, 8)
    assert torch.equal(out[:, 0], x[:, 0])  # CLS never merged, stays first
    assert torch.allclose(st.size.sum(1), torch.full((2, 1), 17.0))
    assert torch.allclose((out * st.size).sum(1), x.sum(1), atol=1e-5)  # size-weighted mass preserved
    out2, st2 = tokens.merge(out, torch.randn(2, 2, 9, 4), 4, st)
    assert out2.shape == (2, 5, 8)
    assert torch.allclose(st2.size.sum(1), torch.full((2, 1), 17.0))
    assert torch.allclose((out2 * st2.size).sum(1), x.sum(1), atol=1e-4)


def test_merge_path_counts_and_proportional_attention(small):
    x = torch.randn(2, 3, 64, 64)
    cfg = ExecConfig(token_keep=0.5, token_layers=(0, 2), token_method="merge")
    out = ours(small, x, cfg)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    counts = [9, 9, 5, 5]  # 16 patches: merge 8 -> 8 (+CLS 9), then 4 -> 5
    assert total_macs(small.module, lambda: small(x[:1])) == vit_macs(small, cfg, 64, 64, counts)
    # proportional attention: a token standing for s patches behaves like s copies of itself
    q, kk, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    st = tokens.TokenState(size=torch.tensor([[[1.0], [3.0]]]))
    prop = F.scaled_dot_product_attention(q, kk, v, attn_mask=st.attn_bias(torch.float32))
    dup = F.scaled_dot_product_attention(q, kk[:, :, [0, 1, 1, 1]], v[:, :, [0, 1, 1, 1]])
    assert torch.allclose(prop, dup, atol=1e-6)


def test_adaptive_threshold_batch_equals_single_images(small):
    """Padding with a key mask must not change any image's result."""
    x = torch.randn(4, 3, 64, 64)
    cfg = ExecConfig(token_threshold=0.6, token_layers=(1, 2))
    batch = ours(small, x, cfg)
    singles = torch.cat([ours(small, x[i:i + 1], cfg) for i in range(4)])
    assert torch.allclose(batch, singles, atol=1e-5, rtol=1e-4)


def test_threshold_counts_follow_attention():
    scores = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25]])
    x = torch.randn(2, 5, 3)
    out, st = tokens.threshold(x, scores, 0.85, tokens.TokenState())
    assert out.shape == (2, 1 + 4, 3)
    assert st.valid.sum(1).tolist() == [3, 5]  # CLS + 2 tokens (0.9 >= 0.85); CLS + 4 tokens


def test_default_token_layers():
    assert default_token_layers(12) == (3, 6, 9)


@pytest.mark.parametrize("cfg,needle", [
    (dict(skip_blocks=(7,)), "outside the model's blocks 0..3"),
    (dict(heads=5), "heads=5 for block 0 is outside 1..4"),
    (dict(mlp_width=1.5), "mlp_width=1.5"),
    (dict(mlp_width=0.0), "mlp_width=0.0"),
    (dict(token_keep=0.3, token_method="merge"), "[0.5, 1]"),
    (dict(resolution=(50, 64)), "resolution=50x64"),
    (dict(decoder_width=0.5), "decoder knobs need a model with a decoder"),
    (dict(variant="b2"), "variant='b2' is not loaded"),
    (dict(heads=(1, 2)), "has 2 values but the model has 4 blocks"),
])
def test_bad_configs_name_field_and_keep_previous(small, cfg, needle):
    x = torch.randn(1, 3, 64, 64)
    good = ExecConfig(skip_blocks=(1,))
    before = ours(small, x, good)
    with pytest.raises(ConfigError) as e:
        small.configure(ExecConfig(**cfg))
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)
    assert small.exec_config == good
    with torch.no_grad():
        assert torch.equal(small(x), before)


def test_unknown_field_and_json_round_trip():
    with pytest.raises(ValueError, match="unknown ExecConfig field 'skip_blockz'"):
        ExecConfig(skip_blockz=(1,))
    cfg = ExecConfig(skip_blocks=[3, 1], heads=(1, 2, 3, 4), mlp_width=0.5, token_keep=0.7, resolution=160)
    assert ExecConfig.from_json(cfg.to_json()) == cfg
    assert hash(ExecConfig.from_json(cfg.to_json())) == hash(cfg)
    assert cfg.skip_blocks == (1, 3) and cfg.resolution == (160, 160)
    assert ExecConfig().is_default and ExecConfig().to_json() == "{}"
    with pytest.raises(ValueError, match="not valid ExecConfig JSON"):
        ExecConfig.from_json("{nope")


def test_configure_is_cheap_and_allocates_nothing(small):
    before = [p.data_ptr() for p in small.module.parameters()]
    cfgs = [ExecConfig(), ExecConfig(heads=2, mlp_width=0.5), ExecConfig(token_keep=0.7)]
    for i in range(300):
        small.configure(cfgs[i % 3])
    assert [p.data_ptr() for p in small.module.parameters()] == before
    assert len(small._plans) == 3  # each config resolved once, then looked up


def test_variant_switch(small):
    other = dynavit.from_config(ViTConfig(**{**SMALL, "num_hidden_layers": 2}))
    small.add_variant("shallow", other)
    x = torch.randn(1, 3, 64, 64)
    a = ours(small, x, ExecConfig(variant="shallow"))
    assert torch.equal(a, ours(other, x))
    with pytest.raises(ConfigError, match="outside the model's blocks 0..1"):
        small.configure(ExecConfig(variant="shallow", skip_blocks=(3,)))
    assert small.exec_config.variant == "shallow"
