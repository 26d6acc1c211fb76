"""Lowering of execution paths, the vector-unit model, path costing and the accelerator store/CLI glue."""

from __future__ import annotations

import pytest
import torch
from transformers import SwinConfig, ViTConfig

import dynavit
from dynavit.accel.layers import MacOp, VecOp
from dynavit.accel.lower import lower, lower_mean
from dynavit.config import ExecConfig
from dynavit.cost import total_macs
from dynavit.data.datasets import list_images, read_image
from dynavit.errors import DynavitError
from dynavit.models.configs import segformer_config

VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=64,
           patch_size=8, num_labels=10)


@pytest.fixture(scope="module")
def vit():
    return dynavit.from_config(ViTConfig(**VIT))


@pytest.fixture(scope="module")
def segformer():
    dm = dynavit.from_config(segformer_config("b0", num_labels=5))
    dm.input_size = (64, 64)
    return dm


VIT_CFGS = [
    ExecConfig(),
    ExecConfig(skip_blocks=(1,), heads=2, mlp_width=0.5),
    ExecConfig(token_keep=0.5, token_layers=(1, 2)),
    ExecConfig(token_keep=0.7, token_method="merge", token_layers=(0, 1, 2, 3)),
    ExecConfig(token_r=12, token_method="merge"),
    ExecConfig(token_r=16, token_method="prune+merge", token_layers=(1, 2)),
    ExecConfig(resolution=(48, 48), skip_attn=(3,), skip_mlp=(0,)),
]


@pytest.mark.parametrize("cfg", VIT_CFGS, ids=lambda c: c.to_json())
def test_lowering_lists_exactly_the_macs_the_profiler_counts(vit, cfg):
    low = lower(vit, cfg)
    vit.configure(cfg)
    x = vit.example_input(1)
    assert low.macs == total_macs(vit.module, lambda: vit(x))
    assert low.macs > 0 and low.vec_ops
    kinds = {op.kind for op in low.mac_ops}
    assert kinds == {"conv", "linear", "attention"}


def test_lowering_shapes_follow_the_config(vit):
    base = lower(vit, ExecConfig())
    # one patch embedding conv, 6 weight GEMMs (q, k, v, o, fc1, fc2) and 2 attention GEMMs per block, a head
    assert sum(op.kind == "conv" for op in base.mac_ops) == 1
    assert sum(op.kind == "linear" for op in base.mac_ops) == 4 * 6 + 1
    qk = [op for op in base.mac_ops if op.kind == "attention"]
    assert len(qk) == 8
    n = (64 // 8) ** 2 + 1
    assert qk[0] == MacOp("attention", B=n, K=n, C=16, G=4)  # QK^T per head
    assert qk[1] == MacOp("attention", B=n, K=16, C=n, G=4)  # AV per head
    fc1 = [op for op in base.mac_ops if op.kind == "linear" and op.K == 256]
    assert fc1 and all(n == op.B and op.C == 64 for op in fc1)
    half = lower(vit, ExecConfig(mlp_width=0.5, heads=2))
    assert {op.K for op in half.mac_ops if op.kind == "linear" and op.C == 64} >= {128}
    assert all(op.G == 2 for op in half.mac_ops if op.kind == "attention")
    # vector ops: layer norms, GELU, residual adds and the attention softmax all appear
    classes = {op.cls for op in base.vec_ops}
    assert {"norm", "activation", "elementwise", "softmax"} <= classes
    soft = [op for op in base.vec_ops if op.cls == "softmax"]
    assert soft[0].elems_out == 4 * n * n


def test_lowering_of_a_segformer_has_depthwise_and_strided_convs(segformer):
    for cfg in (ExecConfig(), ExecConfig(mlp_width=0.5, decoder_width=0.5, skip_blocks=(1,))):
        low = lower(segformer, cfg)
        segformer.configure(cfg)
        x = segformer.example_input(1)
        assert low.macs == total_macs(segformer.module, lambda x=x: segformer(x))
        convs = [op for op in low.mac_ops if op.kind == "conv"]
        assert any(op.G > 1 and op.K == 1 and op.C == 1 for op in convs)  # depthwise 3x3 in Mix-FFN
        assert any(op.SY > 1 for op in convs)  # overlapping strided patch embeddings / reductions
        assert any(op.cls == "resize" for op in low.vec_ops)  # the decoder's upsampling


def test_lowering_of_swin():
    dm = dynavit.from_config(SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                        window_size=4, num_labels=10))
    low = lower(dm, ExecConfig())
    x = dm.example_input(1)
    assert low.macs == total_macs(dm.module, lambda: dm(x))


def test_less_work_lowers_to_fewer_macs_and_vector_elements(vit):
    full = lower(vit, ExecConfig())
    for cfg in VIT_CFGS[1:]:
        low = lower(vit, cfg)
        assert low.macs < full.macs
        assert sum(v.elems_out for v in low.vec_ops) <= sum(v.elems_out for v in full.vec_ops)


def test_lowering_leaves_the_model_on_its_own_path(vit):
    """Lowering measures a path; it must not switch the caller's model to it."""
    own = ExecConfig(mlp_width=0.5)
    vit.configure(own)
    x = vit.example_input(1)
    before = vit(x)
    low = lower(vit, VIT_CFGS[1])
    assert low.config == VIT_CFGS[1] and vit.exec_config == own
    assert torch.equal(vit(x), before)
    assert lower(vit).config == own  # no config: the current path is lowered
    vit.configure(ExecConfig())


def test_lowering_is_deterministic_and_batch_scales(vit):
    a, b = lower(vit, VIT_CFGS[2]), lower(vit, VIT_CFGS[2])
    assert a.mac_ops == b.mac_ops and a.vec_ops == b.vec_ops
    four = lower(vit, VIT_CFGS[2], batch=4)
    assert four.macs == 4 * a.macs


def test_adaptive_threshold_lowers_the_image_it_is_given(vit):
    cfg = ExecConfig(token_threshold=0.5, token_layers=(1,))
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(1, 3, 64, 64, generator=g), torch.zeros(1, 3, 64, 64)
    l1, l2 = lower(vit, cfg, pixel_values=x1), lower(vit, cfg, pixel_values=x2)
    vit.configure(cfg)
    assert l1.macs == total_macs(vit.module, lambda: vit(x1))
    assert l2.macs == total_macs(vit.module, lambda: vit(x2))


def test_lower_mean_averages_each_op_over_real_photos(deit_tiny, assets):
    """DeiT-tiny's per-image merge keeps a different number of tokens on each photo: one op list, averaged."""
    cfg = ExecConfig(token_method="merge", token_threshold=0.895, token_threshold_step=0.01)
    photos = list_images(assets / "imagenet-samples" / "images")[3:300:100]
    images = [deit_tiny.transform(read_image(p))[None] for p in photos]
    each = [lower(deit_tiny, cfg, pixel_values=x) for x in images]
    assert len({lo.macs for lo in each}) == 3
    mean = lower_mean(deit_tiny, cfg, images)
    assert mean.mac_modules == each[0].mac_modules and mean.vec_modules == each[0].vec_modules
    for ops, got in ((list(zip(*(lo.mac_ops for lo in each), strict=True)), mean.mac_ops),
                     (list(zip(*(lo.vec_ops for lo in each), strict=True)), mean.vec_ops)):
        assert len(ops) == len(got)
        for per_image, op in zip(ops, got, strict=True):
            for field in ("B", "K", "C", "G") if isinstance(op, MacOp) else ("elems_in", "elems_out", "flops"):
                assert getattr(op, field) == round(sum(getattr(o, field) for o in per_image) / len(per_image))
    assert min(lo.macs for lo in each) < mean.macs < max(lo.macs for lo in each)
    one = lower_mean(deit_tiny, cfg, images[1:2])
    assert one.mac_ops == each[1].mac_ops and one.vec_ops == each[1].vec_ops
    with pytest.raises(DynavitError, match="different operations"):  # another size resizes the position embeddings
        lower_mean(deit_tiny, cfg, [images[0], images[0][..., :160, :160]])


def test_a_per_image_merge_runs_the_same_ops_whether_or_not_an_image_merges(vit):
    """Lowering averages a path's ops over images: a block that merges nothing must still run them."""
    cfg = ExecConfig(token_method="merge", token_threshold=0.9, token_threshold_step=0.0)
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    flat = torch.full((1, 3, 64, 64), 0.5)  # every patch alike: every pair merges
    each = [lower(vit, cfg, pixel_values=x) for x in (noise, flat)]
    tokens = [[op.B for op in lo.mac_ops if op.kind == "linear" and op.K == 256] for lo in each]  # fc1: B = tokens
    assert set(tokens[0]) == {65} and min(tokens[1]) < 65  # the noise merged nothing, the flat image merged
    mean = lower_mean(vit, cfg, [noise, flat])
    assert mean.mac_modules == each[0].mac_modules and mean.vec_modules == each[0].vec_modules


def test_op_records_reject_impossible_shapes():
    with pytest.raises(ValueError, match="K=0"):
        MacOp("linear", B=4, K=0, C=3)
    with pytest.raises(ValueError, match="kind"):
        MacOp("pool", B=1, K=1, C=1)
    with pytest.raises(ValueError, match="class"):
        VecOp("magic", "x", 1, 1, 1)
    op = MacOp("conv", B=2, K=8, C=3, OY=4, OX=4, FY=3, FX=3, SY=2, SX=2, G=1)
    assert op.macs == 2 * 8 * 3 * 16 * 9
    assert op.input_hw == (9, 9)
