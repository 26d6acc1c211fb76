"""Swin execution paths: exactness of the default path, and every knob against an independent reference.

transformers initialises the relative-position tables and position embeddings to zero and the
LayerNorms to identity, which would hide indexing bugs; ``randomize`` fills them first. Each
test builds a fresh source model: transformers' Swin layers remember the window/shift they
clamped at the last resolution they ran at, so a shared model would not be a fair reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ours, ref_logits, rel_err
from transformers import SwinConfig

import dynavit
from dynavit.config import ConfigError, ExecConfig
from dynavit.cost import total_macs
from dynavit.model import DynamicModel
from dynavit.models.base import resize_input

SMALL = dict(embed_dim=48, depths=[2, 2, 2], num_heads=[2, 4, 8], image_size=112, num_labels=10)


def randomize(dm) -> None:
    with torch.no_grad():
        for name, p in dm.reference.named_parameters():
            if "relative_position_bias_table" in name or "position_embeddings" in name:
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def build(**overrides) -> DynamicModel:
    dm = dynavit.from_config(SwinConfig(**{**SMALL, **overrides}))
    randomize(dm)
    return dm


@pytest.fixture()
def small():
    return build()


def swin_macs(dm, h: int, w: int) -> int:
    """Analytic MACs of one image under the current plan (generalises test_profiler's ``swin_macs``).

    Attention projections and the attention itself run on the map padded to window multiples
    (as transformers does); the MLP on the real tokens; a window larger than the map shrinks to it.
    """
    c = dm.reference.config
    p, plan = c.patch_size, dm.module.plan
    gh, gw, dim = -(-h // p), -(-w // p), c.embed_dim
    macs = gh * gw * dim * c.num_channels * p * p
    i = 0
    for s, depth in enumerate(c.depths):
        ws = min(c.window_size, gh, gw)
        padded = (-(-gh // ws) * ws) * (-(-gw // ws) * ws)
        hd = dim // c.num_heads[s]
        for _ in range(depth):
            bp = plan.blocks[i]
            i += 1
            if bp.attn:
                a = bp.heads * hd
                macs += 4 * padded * dim * a + 2 * padded * ws * ws * a  # q, k, v, o + QK^T, AV
            if bp.mlp:
                macs += 2 * gh * gw * dim * bp.mlp_dim
        if s < len(c.depths) - 1:
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
            macs += gh * gw * 4 * dim * 2 * dim  # patch merging 4C -> 2C
            dim *= 2
    return macs + dim * c.num_labels


def check_macs(dm, cfg: ExecConfig, x: torch.Tensor) -> None:
    dm.configure(cfg)
    h, w = cfg.resolution or x.shape[-2:]
    assert total_macs(dm.module, lambda: dm(x)) == x.shape[0] * swin_macs(dm, h, w)


def hf_layers(hf) -> list:
    return [layer for stage in hf.swin.encoder.layers for layer in stage.blocks]


# ---- default path ----------------------------------------------------------------------------

def test_default_path_swin_t_and_shared_parameters():
    dm = dynavit.from_config(SwinConfig())
    randomize(dm)
    x = torch.randn(1, 3, 224, 224)
    assert rel_err(ours(dm, x), ref_logits(dm.reference, x)) <= 1e-5
    assert {p.data_ptr() for p in dm.module.parameters()} == {p.data_ptr() for p in dm.reference.parameters()}
    sp = dm.space
    assert (sp.family, sp.num_blocks, sp.size_multiple, sp.default_resolution) == ("swin", 12, 32, (224, 224))
    assert sp.heads == (3,) * 2 + (6,) * 2 + (12,) * 6 + (24,) * 2 and set(sp.head_dim) == {32}
    assert sp.mlp_hidden[0] == 384 and sp.mlp_hidden[-1] == 3072 and not sp.cls_token
    with pytest.raises(ConfigError, match="resolution=224x200 is not a multiple of 32"):
        dm.configure(resolution=(224, 200))


@pytest.mark.parametrize("size,absolute", [((112, 112), False), ((100, 164), False), ((112, 160), False),
                                           ((112, 112), True)])
def test_default_path_pads_and_clamps_windows(size, absolute):
    """100x164: patch padding, window padding, odd patch merging and a clamped window (7x11 map).
    (transformers adds absolute embeddings at the configured size only, without interpolation.)"""
    dm = build(use_absolute_embeddings=absolute)
    x = torch.randn(2, 3, *size)
    assert rel_err(ours(dm, x), ref_logits(dm.reference, x)) <= 1e-5
    assert {p.data_ptr() for p in dm.module.parameters()} == {p.data_ptr() for p in dm.reference.parameters()}
    check_macs(dm, ExecConfig(), x[:1])


def test_structure_contract(small):
    m, layers = small.module, hf_layers(small.reference)
    assert len(m.blocks) == len(layers) == small.space.num_blocks == 6 and len(m.merges) == 2
    for blk, layer in zip(m.blocks, layers, strict=True):
        a = layer.attention
        assert (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o) == (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        assert (blk.mlp.fc1, blk.mlp.fc2) == (layer.mlp.fc1, layer.mlp.fc2)
        assert blk.attn.num_heads * blk.attn.head_dim == a.q_proj.out_features


def test_window_smaller_than_configured_reads_table_centre():
    """96x160: the last map is 6x10 < window 7. transformers fails there; we use the 6x6 window
    and the centre of the 13x13 bias table, i.e. transformers with a window-6 table cut from it."""
    dm = build()
    x = torch.randn(1, 3, 96, 160)
    out = ours(dm, x)
    hf = copy.deepcopy(dm.reference)
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias

    for layer in hf.swin.encoder.layers[2].blocks:
        rpb = layer.attention.relative_position_bias
        heads = rpb.relative_position_bias_table.shape[1]
        small_rpb = SwinRelativePositionBias(heads, (6, 6))
        with torch.no_grad():
            small_rpb.relative_position_bias_table.copy_(
                rpb.relative_position_bias_table.view(13, 13, heads)[1:12, 1:12].reshape(-1, heads))
        layer.attention.relative_position_bias = small_rpb
    assert rel_err(out, ref_logits(hf, x)) <= 1e-5
    check_macs(dm, ExecConfig(), x)


def test_cache_follows_parameter_updates_and_training_path(small):
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():  # fills the caches (a later training forward must still work)
        small(x)
    table = hf_layers(small.reference)[1].attention.relative_position_bias.relative_position_bias_table
    with torch.no_grad():
        table.mul_(-1.0)
    assert rel_err(ours(small, x), ref_logits(small.reference, x)) <= 1e-5
    out = small(x)  # grad enabled: bias gathered in the graph
    out.square().sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert rel_err(out.detach(), ref_logits(small.reference, x)) <= 1e-5


# ---- knobs -------------------------------------------------------------------------------------

def test_skip_blocks_equals_source_without_those_blocks(small):
    x = torch.randn(2, 3, 112, 112)
    hf = copy.deepcopy(small.reference)
    del hf.swin.encoder.layers[2].blocks[0]  # global block 4
    del hf.swin.encoder.layers[0].blocks[1]  # global block 1 (a shifted one)
    cfg = ExecConfig(skip_blocks=(1, 4))
    assert rel_err(ours(small, x, cfg), ref_logits(hf, x)) <= 1e-5
    check_macs(small, cfg, x[:1])


class Zero(torch.nn.Module):
    def forward(self, h, *a, **k):
        z = torch.zeros_like(h)
        return (z, None) if a or k else z


def test_skip_attn_and_mlp(small):
    x = torch.randn(2, 3, 100, 164)
    hf = copy.deepcopy(small.reference)
    layers = hf_layers(hf)
    layers[1].attention = Zero()
    layers[2].attention = Zero()
    layers[3].mlp = Zero()
    layers[5].mlp = Zero()
    cfg = ExecConfig(skip_attn=(1, 2), skip_mlp=(3, 5))
    assert rel_err(ours(small, x, cfg), ref_logits(hf, x)) <= 1e-5
    check_macs(small, cfg, x[:1])


@pytest.mark.parametrize("heads", [1, (1, 2, 3, 1, 5, 8)])
def test_heads_equal_zeroed_heads_with_irrelevant_bias(small, heads):
    x = torch.randn(2, 3, 100, 164)
    cfg = ExecConfig(heads=heads)
    out = ours(small, x, cfg)
    hf = copy.deepcopy(small.reference)
    with torch.no_grad():
        for layer, bp in zip(hf_layers(hf), small.module.plan.blocks, strict=True):
            a = layer.attention
            kept = bp.heads * a.head_dim
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                lin.weight[kept:] = 0
                lin.bias[kept:] = 0
            a.o_proj.weight[:, kept:] = 0
            a.relative_position_bias.relative_position_bias_table[:, bp.heads:].normal_(0.0, 100.0)
    assert rel_err(out, ref_logits(hf, x)) <= 1e-5
    check_macs(small, cfg, x[:1])


@pytest.mark.parametrize("width,gran", [(0.5, 1), (0.3, 32), ((1.0, 0.25, 0.5, 0.75, 0.1, 0.9), 8)])
def test_mlp_width_equals_zeroed_channels(small, width, gran):
    x = torch.randn(2, 3, 112, 112)
    cfg = ExecConfig(mlp_width=width, granularity=gran)
    out = ours(small, x, cfg)
    hf = copy.deepcopy(small.reference)
    with torch.no_grad():
        for layer, bp, full in zip(hf_layers(hf), small.module.plan.blocks, small.space.mlp_hidden, strict=True):
            k = bp.mlp_dim
            assert k % gran == 0 or k == full
            layer.mlp.fc1.weight[k:] = 0
            layer.mlp.fc1.bias[k:] = 0
            layer.mlp.fc2.weight[:, k:] = 0
    assert rel_err(out, ref_logits(hf, x)) <= 1e-5
    check_macs(small, cfg, x[:1])


@pytest.mark.parametrize("absolute", [False, True])
def test_resolution_equals_source_on_resized_input(absolute):
    dm = build(use_absolute_embeddings=absolute)
    x = torch.randn(2, 3, 112, 112)
    cfg = ExecConfig(resolution=(144, 176))  # 36x44 map: padded windows in every stage
    ref = ref_logits(dm.reference, resize_input(x, (144, 176)), interpolate_pos_encoding=absolute)
    assert rel_err(ours(dm, x, cfg), ref) <= 1e-5
    check_macs(dm, cfg, x[:1])


def test_knobs_combined(small):
    x = torch.randn(1, 3, 112, 112)
    cfg = ExecConfig(skip_blocks=(2,), skip_mlp=(0,), heads=(2, 1, 4, 3, 6, 8), mlp_width=0.5, resolution=(128, 96))
    out = ours(small, x, cfg)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    check_macs(small, cfg, x)


# ---- validation and switching ------------------------------------------------------------------

@pytest.mark.parametrize("cfg,needle", [
    (dict(token_keep=0.5), "token knobs need a CLS-token model; swin has no CLS token"),
    (dict(token_layers=(1,)), "swin has no CLS token"),
    (dict(heads=3), "heads=3 for block 0 is outside 1..2"),
    (dict(heads=(2, 2, 4, 4, 8, 9)), "heads=9 for block 5 is outside 1..8"),
    (dict(skip_blocks=(6,)), "skip_blocks contains block 6, outside the model's blocks 0..5"),
    (dict(skip_attn=(-1,)), "skip_attn contains block -1"),
    (dict(resolution=(112, 100)), "resolution=112x100 is not a multiple of 16"),
    (dict(decoder_width=0.5), "decoder knobs need a model with a decoder; swin has none"),
    (dict(mlp_width=0.0), "mlp_width=0.0 for block 0 is outside (0, 1]"),
])
def test_bad_configs_name_field_and_keep_previous(small, cfg, needle):
    x = torch.randn(1, 3, 112, 112)
    good = ExecConfig(skip_blocks=(1,), heads=1)
    before = ours(small, x, good)
    plan = small.module.plan
    with pytest.raises(ConfigError) as e:
        small.configure(ExecConfig(**cfg))
    assert needle in str(e.value)
    assert small.exec_config == good and small.module.plan is plan
    with torch.no_grad():
        assert torch.equal(small(x), before)


def test_configure_allocates_no_parameter_memory(small):
    x = torch.randn(1, 3, 112, 112)
    before = [p.data_ptr() for p in small.module.parameters()]
    cfgs = [ExecConfig(), ExecConfig(heads=1, mlp_width=0.5), ExecConfig(skip_blocks=(0, 3), resolution=(96, 128))]
    for i in range(300):
        small.configure(cfgs[i % 3])
        if i < 3:
            with torch.no_grad():
                small(x)
    assert [p.data_ptr() for p in small.module.parameters()] == before
    assert {p.data_ptr() for p in small.reference.parameters()} == set(before)
    assert len(small._plans) == 3
