"""The model is a torch.nn.Module; a calibrated model ships as a folder ``dynavit.load`` reads back."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ours
from transformers import SegformerConfig, ViTConfig, ViTForImageClassification

import dynavit
from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.model import from_config
from dynavit.models import FAMILIES, family_class
from dynavit.models.static import StaticModel
from dynavit.packaging import provenance


def tiny_vit_config() -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8, num_labels=7)


def test_real_deit_is_a_module_that_moves_and_round_trips(deit_tiny_path):
    m = dynavit.load(deit_tiny_path)
    assert isinstance(m, torch.nn.Module)
    x = m.example_input(2)
    with torch.no_grad():
        ref = m.reference(pixel_values=x).logits
        assert torch.equal(m(x), ref)  # the default path IS transformers' DeiT, bit for bit
    m.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    with torch.no_grad():
        y64 = m(x.double())
    assert y64.dtype == torch.float64
    assert float((y64.float() - ref).abs().max()) < 1e-3
    sd = m.state_dict()
    fresh = dynavit.load(deit_tiny_path).to(torch.float64)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x.double()), y64)
    assert m.eval() is m and not m.training and not m.module.training
    m.train()
    assert m.training and m.module.training and all(b.training for b in m.module.blocks)


def test_parameters_are_counted_once():
    dm = from_config(tiny_vit_config())
    n_source = sum(p.numel() for p in dm.reference.parameters())
    assert sum(p.numel() for p in dm.parameters()) == n_source
    # the family forward runs on those very tensors
    assert {p.data_ptr() for p in dm.module.parameters()} <= {p.data_ptr() for p in dm.parameters()}


def _calibrated_tiny_vit():
    dm = from_config(tiny_vit_config())
    dm.calibrate(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), criterion="magnitude",
                 batch_size=8)
    return dm


@pytest.mark.parametrize("cfg", [ExecConfig(), ExecConfig(mlp_width=0.5, heads=2)])
def test_save_pretrained_round_trip_is_exact(tmp_path, cfg):
    dm = _calibrated_tiny_vit()
    folder = dm.save_pretrained(tmp_path / "calibrated")
    back = dynavit.load(folder)
    assert back.calibration is not None
    assert back.calibration.identity() == dm.calibration.identity()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours(back, x, cfg), ours(dm, x, cfg))
    # transformers reads the same folder as the source model (weights in calibrated order)
    hf = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(hf(pixel_values=x).logits, ours(dm, x))
    with pytest.raises(DynavitError, match="already calibrated"):
        back.load_calibration(folder / "calibration")


def test_save_pretrained_real_deit_width_path(tmp_path, deit_tiny_path, assets):
    dm = dynavit.load(deit_tiny_path)
    images = sorted((assets / "imagenet-samples" / "images").iterdir())[:8]
    from PIL import Image

    dm.calibrate([Image.open(p).convert("RGB") for p in images], criterion="magnitude", batch_size=4)
    back = dynavit.load(dm.save_pretrained(tmp_path / "deit-cal"))
    x = dm.example_input(2)
    for cfg in (ExecConfig(), ExecConfig(mlp_width=0.5, heads=2)):
        assert torch.equal(ours(back, x, cfg), ours(dm, x, cfg))
    pre = json.loads((tmp_path / "deit-cal" / "preprocessor_config.json").read_text())
    assert pre["crop_pct"] == dm.crop_pct and tuple(pre["image_mean"]) == dm.mean


def test_save_pretrained_keeps_the_segformer_input_size(tmp_path):
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
                          hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16,
                          num_labels=5)
    dm = from_config(cfg)
    dm.input_size = (64, 96)
    back = dynavit.load(dm.save_pretrained(tmp_path / "seg"))
    assert back.input_size == (64, 96) and back.task == "segmentation"


def test_manifest_names_a_local_source_relative_to_the_folder(tmp_path):
    first = from_config(tiny_vit_config()).save_pretrained(tmp_path / "runs" / "a" / "model")
    second = dynavit.load(first).save_pretrained(tmp_path / "models" / "b")
    saved_from = json.loads((second / "dynavit.json").read_text())["saved_from"]
    assert saved_from == "../../runs/a/model" and (second / saved_from).resolve() == first.resolve()
    assert provenance("facebook/deit-tiny-patch16-224", second) == "facebook/deit-tiny-patch16-224"


def test_unknown_manifest_format_is_refused(tmp_path):
    folder = from_config(tiny_vit_config()).save_pretrained(tmp_path / "m")
    (folder / "dynavit.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(DynavitError, match="format 99"):
        dynavit.load(folder)


def test_registry_picks_a_family_or_the_static_fallback():
    dm = from_config(tiny_vit_config())
    assert family_class(dm.reference) is FAMILIES[0] and dm.dynamic
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert family_class(plain) is StaticModel


def _family_models():
    from transformers import SwinConfig

    seg = SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 2, 1, 1], sr_ratios=[8, 4, 2, 1],
                          hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16,
                          num_labels=5)
    swin = SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=32, window_size=4, num_labels=5)
    return [(from_config(tiny_vit_config()), (32, 32), [ExecConfig(mlp_width=0.5), ExecConfig(skip_attn=(2,))]),
            (from_config(swin), (32, 32), [ExecConfig(heads=1), ExecConfig(heads=1, skip_mlp=(3,))]),
            (from_config(seg), (64, 64), [ExecConfig(decoder_branches=(0, 1)), ExecConfig(skip_mlp=(4,)),
                                          ExecConfig(decoder_width=0.5)])]


@pytest.mark.parametrize("case", range(3), ids=["vit", "swin", "segformer"])
def test_block_steps_and_prefix_keys_are_sound(case):
    """Continuing another path's carry wherever ``prefix_key`` says they agree gives the path's own output."""
    dm, size, cfgs = _family_models()[case]
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    impl = dm.module
    assert impl.steps
    for first, second in zip(cfgs, cfgs[1:], strict=False):
        want = ours(dm, x, second)
        plan2 = impl.plan
        dm.configure(first)
        plan1, carry = impl.plan, None
        with torch.no_grad():
            carry = impl.begin(x)
            depth = 0
            while depth < len(impl.blocks) and impl.prefix_key(plan1, depth + 1) == impl.prefix_key(plan2, depth + 1):
                carry = impl.step(carry, depth)
                depth += 1
            shared = [t for t in carry if isinstance(t, torch.Tensor)]
            kept = [t.clone() for t in shared]
            dm.configure(second)
            for i in range(depth, len(impl.blocks)):
                carry = impl.step(carry, i)
            got = impl.end(carry)
        assert torch.equal(got, want)
        assert depth < len(impl.blocks)  # the paths differ somewhere
        # steps never write into a carry they were given: a sweep can keep it for the next path
        assert all(torch.equal(a, b) for a, b in zip(shared, kept, strict=True))


def test_a_model_trained_after_calibrating_is_saved_under_its_new_weights(tmp_path):
    from dynavit.calibrate import fingerprint
    from dynavit.sweep.measured import model_fingerprint

    dm = _calibrated_tiny_vit()
    before = dm.calibration.fingerprint
    with torch.no_grad():  # a training step's worth of change
        dm.reference.classifier.weight.add_(0.01)
    back = dynavit.load(dm.save_pretrained(tmp_path / "trained", half=True))
    assert back.calibration.fingerprint == fingerprint(back.base_module) != before
    assert model_fingerprint(back) != before  # a store swept before training is refused
    assert back.reference.classifier.weight.dtype == torch.float32  # fp16 on disk, fp32 loaded
