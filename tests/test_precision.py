"""The precision knob: int8 linear layers beside fp32, composed with every other knob, switched in O(1)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, tiny_vit

import dynavit
from dynavit.config import ConfigError, ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.data import open_dataset
from dynavit.knobs import quant
from dynavit.sweep.space import load_space

INT8 = ExecConfig(precision="int8")


@pytest.fixture
def vit():
    return tiny_vit(dim=64, layers=3).eval()


def run(dm, cfg: ExecConfig, x: torch.Tensor) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        return dm(x)


def test_int8_is_close_to_fp32_and_fp32_stays_bit_identical(vit) -> None:
    x = vit.example_input(4)
    ref = run(vit, ExecConfig(), x)
    q = run(vit, INT8, x)
    assert not torch.equal(q, ref)  # it does run int8
    assert rel_err(q, ref) < 0.06  # random weights; int8 weights per channel, activations per tensor
    assert torch.equal(run(vit, ExecConfig(), x), ref)  # back to fp32: bit for bit the weights as loaded


@pytest.mark.parametrize("changes", [
    {"mlp_width": 0.5}, {"heads": 1}, {"token_keep": 0.7}, {"token_method": "merge", "token_keep": 0.9},
    {"resolution": 12}, {"skip_blocks": (1,)}, {"mlp_width": 0.7, "heads": 1, "token_keep": 0.8, "skip_mlp": (2,)},
])
def test_int8_composes_with_the_other_knobs(vit, changes) -> None:
    x = vit.example_input(4)
    ref = run(vit, ExecConfig(**changes), x)
    q = run(vit, ExecConfig(precision="int8", **changes), x)
    assert q.shape == ref.shape and not torch.equal(q, ref)
    assert rel_err(q, ref) < 0.08


def test_switching_precision_quantizes_once(vit) -> None:
    x = vit.example_input(2)
    before = dict(quant.counts)
    vit.configure(INT8)  # the first int8 configure makes every block linear's int8 weights
    made = quant.counts["quantized"] - before["quantized"]
    assert made == len(quant.linears(vit.module)) == 3 * 6
    cfgs = [ExecConfig(), INT8, ExecConfig(precision="int8", mlp_width=0.5, heads=1), ExecConfig(mlp_width=0.5)]
    for cfg in cfgs:  # the first pass packs each width once
        run(vit, cfg, x)
    settled = dict(quant.counts)
    for _ in range(3):
        for cfg in cfgs:
            run(vit, cfg, x)
    assert quant.counts == settled and settled["quantized"] - before["quantized"] == made
    assert quant.pack_bytes(vit.module)["n_packs"] == 3 * 6 + 3 * 6  # full width + (mlp 0.5, 1 head)


def test_changed_weights_are_quantized_again(vit) -> None:
    x = vit.example_input(2)
    q = run(vit, INT8, x)
    with torch.no_grad():
        for p in vit.model.parameters():
            p.mul_(1.5) if p.dim() == 2 else None
    assert not torch.equal(run(vit, INT8, x), q)  # stale int8 weights would give the old output


def test_int8_counts_the_same_macs(vit) -> None:
    x = vit.example_input(1)
    vit.configure(ExecConfig(mlp_width=0.5))
    fp32 = macs_per_image(vit, x)
    vit.configure(ExecConfig(mlp_width=0.5, precision="int8"))
    assert macs_per_image(vit, x) == fp32


def test_half_precisions_are_refused_on_cpu_with_the_reason(vit) -> None:
    for name in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match=f"precision='{name}' on CPU is refused.*allow_cpu_half"):
            vit.configure(precision=name)
    assert vit.exec_config == ExecConfig()  # a refused config changes nothing
    vit.allow_cpu_half = True
    x = vit.example_input(2)
    ref = run(vit, ExecConfig(), x)
    assert rel_err(run(vit, ExecConfig(precision="bf16", mlp_width=0.5), x),
                   run(vit, ExecConfig(mlp_width=0.5), x)) < 0.05
    assert torch.equal(run(vit, ExecConfig(), x), ref)


def test_precision_is_validated_and_round_trips() -> None:
    with pytest.raises(ConfigError, match="precision='int4' must be one of fp32, int8, fp16, bf16"):
        ExecConfig(precision="int4")
    cfg = ExecConfig(precision="int8", mlp_width=0.75)
    assert ExecConfig.from_json(cfg.to_json()) == cfg and '"precision": "int8"' in cfg.to_json()
    assert ExecConfig().to_dict() == {}  # fp32 is the default: a stored default config is unchanged
    assert hash(cfg) != hash(cfg.replace(precision="fp32"))


def test_int8_prefix_never_serves_fp32(vit) -> None:
    """Sweeps reuse activations between configs with equal prefix keys: precision must be in the key."""
    impl = vit.module
    vit.configure(ExecConfig(mlp_width=0.5))
    a = impl.prefix_key(impl.plan, 2)
    vit.configure(ExecConfig(mlp_width=0.5, precision="int8"))
    assert impl.prefix_key(impl.plan, 2) != a


def test_load_dtype_makes_the_int8_weights(deit_tiny_path) -> None:
    before = quant.counts["quantized"]
    dm = dynavit.load(deit_tiny_path, dtype="int8")
    assert dm.exec_config == INT8 and quant.counts["quantized"] - before == 12 * 6
    with pytest.raises(ConfigError, match="precision"):
        dynavit.load(deit_tiny_path, dtype="fp8")


def test_space_composes_precision(vit) -> None:
    s = load_space({"mlp_width": [1.0, 0.5]}, vit.space, precisions=["int8"])
    cfgs = {s.config(p) for p in s.points()}
    assert cfgs == {ExecConfig(), ExecConfig(mlp_width=0.5), INT8, ExecConfig(mlp_width=0.5, precision="int8")}
    preset = load_space("precision", vit.space)
    assert [k.name for k in preset.knobs][-1] == "precision" and preset.size == 2 * load_space("small", vit.space).size


def test_sweep_writes_rows_for_both_precisions(assets, deit_tiny_path, tmp_path) -> None:
    from dynavit.sweep.run import SweepTarget, run_sweep

    target = SweepTarget(model=str(deit_tiny_path), data=str(assets / "imagenet-samples"), limit=8, batch_size=8,
                         n_boot=50, latency_repeats=1, measure_latency=False)
    s = run_sweep(target, space={"mlp_width": [1.0, 0.5]}, strategy="grid", store=tmp_path / "r.db",
                  progress=False, precisions=["int8"])
    by_cfg = {r.config: r for r in s.rows}
    assert set(by_cfg) == {ExecConfig(), ExecConfig(mlp_width=0.5), INT8, ExecConfig(mlp_width=0.5, precision="int8")}
    assert by_cfg[INT8].macs == pytest.approx(by_cfg[ExecConfig()].macs)
    assert by_cfg[INT8].per_image.shape == by_cfg[ExecConfig()].per_image.shape
    from dynavit.sweep import ResultStore

    with ResultStore(tmp_path / "r.db", readonly=True) as rs:  # the stored config JSON carries the precision
        assert INT8 in {r.config for r in rs.rows()}
    from dynavit.runtime.menu import Menu

    assert {e.config.precision for e in Menu.read(tmp_path / "r.db", cost="macs", precisions=["int8"])} == {"int8"}
    with pytest.raises(dynavit.DynavitError, match="no rows at precision fp16"):
        Menu.read(tmp_path / "r.db", precisions=["fp16"])


def test_load_configured_applies_the_dtype_to_a_config(deit_tiny_path) -> None:
    from dynavit.configured import load_configured

    dm = load_configured(str(deit_tiny_path), config='{"mlp_width": 0.5}', dtype="int8")
    assert dm.exec_config == ExecConfig(mlp_width=0.5, precision="int8")


def test_int8_agrees_with_fp32_on_real_photographs(deit_tiny_path, assets) -> None:
    """DeiT-tiny on 64 ImageNet sample photographs: int8 top-1 equals fp32 top-1 on >= 90 % of them."""
    dm = dynavit.load(deit_tiny_path).eval()
    ds = open_dataset(assets / "imagenet-samples")
    x = torch.stack([dm.transform(ds.load(i)[0]) for i in range(0, 500, 500 // 64)][:64])
    fp32 = run(dm, ExecConfig(), x)
    int8 = run(dm, INT8, x)
    agree = (fp32.argmax(1) == int8.argmax(1)).float().mean().item()
    assert agree >= 0.9, agree


@pytest.mark.parametrize("family", ["swin", "segformer"])
def test_int8_runs_every_family(family) -> None:
    from transformers import SwinConfig

    from dynavit.models.configs import segformer_config

    cfg = (SwinConfig(embed_dim=48, depths=[2, 2], num_heads=[2, 4], image_size=64, num_labels=10)
           if family == "swin" else segformer_config("b0", num_labels=5))
    dm = dynavit.from_config(cfg).eval()
    x = dm.example_input(2, (64, 64))
    changes = {"mlp_width": 0.5, "heads": 1 if family == "swin" else None}
    ref = run(dm, ExecConfig(**changes), x)
    q = run(dm, ExecConfig(precision="int8", **changes), x)
    assert q.shape == ref.shape and not torch.equal(q, ref) and rel_err(q, ref) < 0.08
    assert torch.equal(run(dm, ExecConfig(**changes), x), ref)


def test_accelerator_lowering_of_an_int8_path(vit) -> None:
    from dynavit.accel.lower import lower
    from dynavit.cost import total_macs

    cfg = ExecConfig(precision="int8", mlp_width=0.5, heads=1)
    low, fp32 = lower(vit, cfg, bits=16), lower(vit, cfg.replace(precision="fp32"), bits=16)
    vit.configure(cfg)
    x = vit.example_input(1)
    assert low.macs == fp32.macs == total_macs(vit.module, lambda: vit(x))
    int8_ops = [op for op in low.mac_ops if op.bits == 8]
    assert len(int8_ops) == len(quant.linears(vit.module)) and {op.kind for op in int8_ops} == {"linear"}
    assert {op.bits for op in fp32.mac_ops} == {16}
