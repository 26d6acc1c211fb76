"""SegFormer execution paths: exactness of the default path, every knob against an independent reference
(transformers' model with the skipped parts deleted or zeroed), and exact MACs against an analytic count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynavit
from dynavit.config import ConfigError, ExecConfig
from dynavit.cost import count, total_macs
from dynavit.knobs.width import recording
from dynavit.models.base import resize_input
from dynavit.models.configs import segformer_config

LABELS = 11


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded: tiny kernels on a shared 2-core machine spend their time in OpenMP barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise_bn(hf: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine, so slicing them is actually tested."""
    g = torch.Generator().manual_seed(1)
    bn = hf.decode_head.batch_norm
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


@pytest.fixture(scope="module")
def b0():
    dm = dynavit.from_config(segformer_config("b0", num_labels=LABELS))
    randomise_bn(dm.reference)
    return dm


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||a - ref|| / ||ref||, max |a - ref| / max |ref|)."""
    return float((a - ref).norm() / ref.norm()), float((a - ref).abs().max() / ref.abs().max())


def assert_same(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.shape == ref.shape
    rel, rmax = errors(a, ref)
    assert rel <= tol and rmax <= tol, (rel, rmax)


def ref_logits(hf: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(pixel_values=x).logits


def ours(dm, x: torch.Tensor, cfg: ExecConfig | None = None) -> torch.Tensor:
    dm.configure(cfg or ExecConfig())
    with torch.no_grad():
        return dm(x)


def seg_macs(dm, h: int, w: int) -> int:
    """Analytic MACs of the current plan (generalises test_profiler's ``segformer_macs``).

    Per stage s (n tokens of d channels, SR ratio r, m = (h // r)(w // r) key/value tokens):
    patch conv n d c_in k^2; per block with a = heads * head_dim: SR conv m d^2 r^2 (r > 1),
    q n d a, k and v 2 m d a, QK^T and AV 2 n m a, o n a d; Mix-FFN with k hidden: 2 n d k + 9 n k.
    Decoder of width E over kept branches: linear_c n_i d_i E, fuse n_0 E^2 each, classifier
    n_0 E labels. Stages after the last kept branch are not run.
    """
    c, plan = dm.reference.config, dm.module.plan
    if plan.resolution is not None:
        h, w = plan.resolution
    e = plan.decoder_dim
    macs, cin, blk, sizes = 0, c.num_channels, 0, []
    for s in range(max(plan.decoder_branches) + 1):
        k, st, d, r = c.patch_sizes[s], c.strides[s], c.hidden_sizes[s], c.sr_ratios[s]
        h, w = (h + 2 * (k // 2) - k) // st + 1, (w + 2 * (k // 2) - k) // st + 1
        n, m, hd = h * w, (h // r) * (w // r), d // c.num_attention_heads[s]
        macs += n * d * cin * k * k
        for bp in plan.blocks[blk:blk + c.depths[s]]:
            if bp.attn:
                a = bp.heads * hd
                macs += (m * d * d * r * r if r > 1 else 0) + n * d * a + 2 * m * d * a + 2 * n * m * a + n * a * d
            if bp.mlp:
                macs += 2 * n * d * bp.mlp_dim + 9 * n * bp.mlp_dim
        blk += c.depths[s]
        sizes.append((n, d))
        cin = d
    n0 = sizes[0][0]
    macs += sum(sizes[i][0] * sizes[i][1] * e + n0 * e * e for i in plan.decoder_branches)
    return macs + n0 * e * c.num_labels


def macs_of(dm, x: torch.Tensor) -> int:
    return total_macs(dm.module, lambda: dm(x[:1]))


# ---- an independent reference: transformers' model with the skipped parts deleted or zeroed ----------------------
class ZeroAttention(nn.Module):
    def forward(self, h, *args, **kwargs):
        return torch.zeros_like(h), None


class ZeroMLP(nn.Module):
    def forward(self, h, *args, **kwargs):
        return torch.zeros_like(h)


def hf_equivalent(dm, cfg: ExecConfig) -> nn.Module:
    """A deepcopy of the HF model that computes what ``cfg`` computes, by deleting and zeroing only."""
    plan = dm.configure(cfg).module.plan
    hf = copy.deepcopy(dm.reference)
    layers = [(s, layer) for s in hf.segformer.stages for layer in s.blocks]
    with torch.no_grad():
        for (_, layer), bp in zip(layers, plan.blocks, strict=True):
            att = layer.attention
            keep = bp.heads * att.head_dim
            for lin in (att.q_proj, att.k_proj, att.v_proj):
                lin.weight[keep:] = 0
                lin.bias[keep:] = 0
            att.o_proj.weight[:, keep:] = 0
            k, mlp = bp.mlp_dim, layer.mlp
            mlp.fc1.weight[k:] = 0
            mlp.fc1.bias[k:] = 0
            mlp.dwconv.dwconv.weight[k:] = 0
            mlp.dwconv.dwconv.bias[k:] = 0
            mlp.fc2.weight[:, k:] = 0
            if not bp.attn:
                layer.attention = ZeroAttention()
            if not bp.mlp:
                layer.mlp = ZeroMLP()
        head = hf.decode_head
        e, full, nb = plan.decoder_dim, dm.space.decoder_width, dm.space.decoder_branches
        for i, proj in enumerate(head.linear_projections):
            proj.proj.weight[e:] = 0
            proj.proj.bias[e:] = 0
            col = (nb - 1 - i) * full  # transformers concatenates the branches in reverse order
            if i in plan.decoder_branches:
                head.linear_fuse.weight[:, col + e:col + full] = 0
            else:
                head.linear_fuse.weight[:, col:col + full] = 0
        head.linear_fuse.weight[e:] = 0
        head.classifier.weight[:, e:] = 0
    for i in sorted(cfg.skip_blocks, reverse=True):
        stage, layer = layers[i]
        del stage.blocks[list(stage.blocks).index(layer)]
    return hf


KNOBS = {
    "skip_blocks": ExecConfig(skip_blocks=(0, 1, 5)),  # a whole stage's blocks, and one more
    "skip_attn_mlp": ExecConfig(skip_attn=(2, 6), skip_mlp=(3, 7)),
    "heads": ExecConfig(heads=(1, 1, 1, 2, 3, 5, 4, 8)),
    "heads_int": ExecConfig(heads=1),
    "mlp_width": ExecConfig(mlp_width=0.4),
    "mlp_width_per_block": ExecConfig(mlp_width=(1.0, 0.5, 0.25, 1.0, 0.1, 0.75, 0.3, 1.0)),
    "decoder_width": ExecConfig(decoder_width=0.4),
    "decoder_branches": ExecConfig(decoder_branches=(0, 2)),
    "decoder_branches_early": ExecConfig(decoder_branches=(1,)),  # stages 2 and 3 are not run
    "resolution": ExecConfig(resolution=(96, 160)),
    "combined": ExecConfig(skip_blocks=(1,), skip_attn=(4,), skip_mlp=(6,), heads=(1, 1, 1, 2, 5, 3, 8, 4),
                           mlp_width=0.5, decoder_width=0.7, decoder_branches=(0, 1, 3), resolution=(64, 96),
                           granularity=8),
}


@pytest.mark.parametrize("name", KNOBS)
def test_knob_equals_hf_with_parts_removed_and_macs_are_exact(b0, x, name):
    cfg = KNOBS[name]
    default, default_macs = ours(b0, x), macs_of(b0, x)
    out = ours(b0, x, cfg)
    assert_same(out, ref_logits(hf_equivalent(b0, cfg), resize_input(x, cfg.resolution)))
    assert macs_of(b0, x) == seg_macs(b0, 128, 128) < default_macs
    if cfg.resolution is None:
        assert errors(out, default)[0] > 1e-3  # the knob did change the output


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_default_path_reproduces_hf(variant, b0, x):
    dm = b0 if variant == "b0" else dynavit.from_config(segformer_config("b2", num_labels=LABELS))
    assert type(dm.module).__name__ == "DynSegformer"
    assert_same(ours(dm, x), ref_logits(dm.reference, x))
    x2 = torch.randn(1, 3, 160, 224)
    out = ours(dm, x2)
    assert out.shape == (1, LABELS, 40, 56) and out.is_contiguous()
    assert_same(out, ref_logits(dm.reference, x2))
    assert {p.data_ptr() for p in dm.module.parameters()} == {p.data_ptr() for p in dm.reference.parameters()}
    # the analytic count at the default config is the HF model's own count
    assert macs_of(dm, x) == seg_macs(dm, 128, 128) == total_macs(dm.reference, lambda: dm.reference(x[:1]))


def test_space_and_module_contract(b0):
    s, hf = b0.space, b0.reference
    assert (s.family, s.num_blocks, s.cls_token, s.size_multiple) == ("segformer", 8, False, 32)
    assert s.heads == (1, 1, 2, 2, 5, 5, 8, 8) and s.head_dim == (32,) * 8
    assert s.mlp_hidden == (128, 128, 256, 256, 640, 640, 1024, 1024)
    assert (s.decoder_width, s.decoder_branches, s.default_resolution) == (256, 4, (512, 512))
    layers = [layer for st in hf.segformer.stages for layer in st.blocks]
    for blk, layer in zip(b0.module.blocks, layers, strict=True):
        a, m = layer.attention, layer.mlp
        assert (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o) == (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        assert (blk.mlp.fc1, blk.mlp.fc2, blk.mlp.dwconv) == (m.fc1, m.fc2, m.dwconv.dwconv)
    head, dec = hf.decode_head, b0.module.decoder
    assert list(dec.linear_c) == [p.proj for p in head.linear_projections]
    assert (dec.fuse, dec.bn, dec.classifier) == (head.linear_fuse, head.batch_norm, head.classifier)


def test_profiler_sees_decoder_modules_by_name(b0, x):
    """The decoder's layers run as themselves (on weight views): their MACs are attributed to their names."""
    b0.configure(decoder_width=0.5, decoder_branches=(0, 3))
    recs = count(b0.module, lambda: b0(x[:1]), track_memory=False).records

    def macs(name: str) -> int:
        return sum(c.macs for r in recs if name in r.modules for c in r.costs)

    n0, e = 32 * 32, 128
    assert macs("decoder.fuse") == 2 * n0 * e * e
    assert macs("decoder.classifier") == n0 * e * LABELS
    assert macs("decoder.linear_c.3") == 4 * 4 * 256 * e and macs("decoder.linear_c.1") == 0


def test_width_observer_sees_every_sliced_group(b0, x):
    """Calibration's recorder gets the MLP hidden, per-head, branch and fused activations, at the kept width."""
    b0.configure(decoder_width=0.5, decoder_branches=(0, 3), heads=1, mlp_width=0.5)
    seen: dict[int, tuple[int, ...]] = {}
    with torch.no_grad(), recording(lambda layer, t: seen.__setitem__(id(layer), tuple(t.shape))):
        b0(x[:1])
    dec = b0.module.decoder
    assert seen[id(dec.linear_c[0])] == (1, 128, 32, 32) and seen[id(dec.linear_c[3])] == (1, 128, 4, 4)
    assert id(dec.linear_c[1]) not in seen and seen[id(dec.classifier)] == (1, 128, 32, 32)
    for blk, hidden in zip(b0.module.blocks, b0.space.mlp_hidden, strict=True):
        assert seen[id(blk.mlp.fc2)][-1] == hidden // 2 and seen[id(blk.attn.o)][1] == 1
    assert dec.fuse.weight[:, dec.branch_columns(0)].shape[1] == 256 and dec.branch_columns(3) == slice(0, 256)


def test_granularity_rounds_channels_up(b0, x):
    b0.configure(mlp_width=0.3, decoder_width=0.3, granularity=32)
    plan = b0.module.plan
    # ceil(0.3 * 128) = 39 -> 64, 77 -> 96, 192 -> 192, 308 -> 320; decoder 77 -> 96
    assert [bp.mlp_dim for bp in plan.blocks] == [64, 64, 96, 96, 192, 192, 320, 320]
    assert plan.decoder_dim == 96
    assert macs_of(b0, x) == seg_macs(b0, 128, 128)
    b0.configure(mlp_width=0.3, decoder_width=0.3)
    assert plan.decoder_dim > b0.module.plan.decoder_dim == 77
    assert macs_of(b0, x) == seg_macs(b0, 128, 128)


@pytest.mark.parametrize("bad, words", [
    (dict(token_keep=0.5), ("token", "CLS")),
    (dict(decoder_branches=[4]), ("decoder_branches", "0..3")),
    (dict(decoder_width=0), ("decoder_width", "(0, 1]")),
    (dict(heads=2), ("heads=2", "1..1")),
    (dict(heads=(1, 1, 2, 2, 5, 6, 8, 8)), ("heads=6", "block 5", "1..5")),
    (dict(skip_blocks=[8]), ("skip_blocks", "0..7")),
    (dict(resolution=(100, 128)), ("resolution", "multiple of 32")),
])
def test_bad_config_raises_and_keeps_previous(b0, x, bad, words):
    good = ExecConfig(mlp_width=0.5)
    before = ours(b0, x, good)
    with pytest.raises(ConfigError) as err:
        b0.configure(**bad)
    assert isinstance(err.value, ValueError)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert b0.exec_config == good and b0.module.plan.config == good
    with torch.no_grad():
        assert torch.equal(b0(x), before)


def test_configure_allocates_no_parameter_memory(b0, x):
    def ptrs():
        return [t.data_ptr() for t in (*b0.module.parameters(), *b0.module.buffers())]

    start = ptrs()
    for _ in range(20):
        for cfg in KNOBS.values():
            b0.configure(cfg)
    assert ptrs() == start
    ours(b0, x[:1], KNOBS["combined"])
    assert ptrs() == start
