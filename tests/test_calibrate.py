"""Calibration: importance ranking, in-place reordering that keeps the full model, persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig

import dynavit
from dynavit.calibrate import Calibration
from dynavit.config import ExecConfig
from dynavit.data.datasets import list_images, read_image

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, num_labels=10)


def kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"))


@pytest.fixture()
def small_and_images():
    dm = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    g = torch.Generator().manual_seed(3)
    return dm, torch.randn(24, 3, 32, 32, generator=g)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_reordering_keeps_the_full_model(small_and_images, criterion):
    dm, imgs = small_and_images
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = dm(x)
    ptrs = [p.data_ptr() for p in dm.module.parameters()]
    cal = dm.calibrate(imgs, criterion=criterion, batch_size=8)
    with torch.no_grad():
        after = dm(x)
        ref = dm.reference(pixel_values=x).logits  # shares the (reordered) tensors
    assert float((after - before).norm() / before.norm()) <= 1e-5
    assert float((after - ref).norm() / ref.norm()) <= 1e-5
    assert [p.data_ptr() for p in dm.module.parameters()] == ptrs  # reordered in place
    assert cal.criterion == criterion and len(cal.perms["mlp"]) == 3
    for p in cal.perms["mlp"]:
        assert sorted(p.tolist()) == list(range(128))
    assert set(cal.block_kl) == {"block", "attn", "mlp"} and len(cal.block_order()) == 3


def test_auto_compares_every_criterion_and_ranks_first_channels_first(small_and_images):
    dm, imgs = small_and_images
    cal = dm.calibrate(imgs, batch_size=8)
    assert set(cal.comparison) == {"magnitude", "variance", "taylor"}
    assert cal.criterion == min(cal.comparison, key=cal.comparison.get)


def test_calibrating_inside_inference_mode_matches_outside(small_and_images):
    """The taylor criterion needs autograd: calibrate leaves inference mode, inputs made in it included."""
    dm, imgs = small_and_images
    twin = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    with torch.inference_mode():
        frozen = imgs.clone()
        cal = dm.calibrate(frozen, criterion="taylor", batch_size=8)
    ref = twin.calibrate(imgs, criterion="taylor", batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(cal.perms["mlp"], ref.perms["mlp"], strict=True))
    assert cal.skip_orders == ref.skip_orders


def test_calibration_helps_reduced_paths_on_real_model(deit_tiny_path, assets):
    """Calibrated on CamVid frames; reduced paths judged on ImageNet photos it never saw."""
    dm = dynavit.load(deit_tiny_path)
    calib = [read_image(p) for p in list_images(assets / "camvid" / "train" / "images")[::23][:16]]
    held = torch.stack([dm.transform(read_image(p)) for p in list_images(assets / "imagenet-samples" / "images")[:32]])
    cfgs = [ExecConfig(mlp_width=0.5), ExecConfig(heads=2)]

    def kls() -> list[float]:
        dm.configure(ExecConfig())
        with torch.no_grad():
            ref = dm(held)
            out = []
            for c in cfgs:
                dm.configure(c)
                out.append(kl(ref, dm(held)))
        dm.configure(ExecConfig())
        return out

    before = kls()
    dm.calibrate(calib, criterion="magnitude")
    after = kls()
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_composed_skip_orders_are_greedy_and_lead_every_block_order():
    """Each next block of a composed order is the one whose skip, added to those before it, costs least KL."""
    dm = dynavit.from_config(ViTConfig(**{**SMALL, "num_hidden_layers": 6}), seed=1)
    imgs = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cal = dm.calibrate(imgs, criterion="magnitude", batch_size=8, compensate=False)
    with torch.no_grad():
        ref = dm.configure(ExecConfig())(imgs)
        for kind, key in (("block", "skip_blocks"), ("attn", "skip_attn"), ("mlp", "skip_mlp")):
            order = cal.skip_orders[kind]
            assert len(order) == 3 and order[0] == min(range(6), key=cal.block_kl[kind].__getitem__)
            for step in (1, 2):  # recomputed with plain forwards (the calibration shares prefixes)
                cost = {j: kl(ref, dm.configure(ExecConfig(**{key: tuple(sorted([*order[:step], j]))}))(imgs))
                        for j in range(6) if j not in order[:step]}
                assert order[step] == min(cost, key=cost.get), (kind, step, cost)
            full = cal.block_order(kind)
            assert full[:3] == order and sorted(full) == list(range(6))
            rest = full[3:]
            assert rest == sorted(rest, key=cal.block_kl[kind].__getitem__)
    plain = Calibration(criterion=cal.criterion, perms=cal.perms, block_kl=cal.block_kl)
    assert plain.block_order("attn") == sorted(range(6), key=cal.block_kl["attn"].__getitem__)
    assert plain.identity() != cal.identity()  # a store pins which order its skip levels meant


def test_save_load_round_trip_and_wrong_model(tmp_path, small_and_images):
    dm, imgs = small_and_images
    dm.calibrate(imgs, criterion="magnitude", batch_size=8)
    dm.save_calibration(tmp_path / "cal")
    fresh = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    loaded = fresh.load_calibration(tmp_path / "cal")
    assert isinstance(loaded, Calibration) and loaded.block_kl == dm.calibration.block_kl
    assert loaded.skip_orders == dm.calibration.skip_orders and loaded.identity() == dm.calibration.identity()
    x = torch.randn(2, 3, 32, 32)
    cfg = ExecConfig(mlp_width=0.5, heads=2)
    with torch.no_grad():
        assert torch.allclose(dm.configure(cfg)(x), fresh.configure(cfg)(x), atol=1e-6)
    with pytest.raises(dynavit.DynavitError, match="already calibrated"):
        fresh.load_calibration(tmp_path / "cal")
    other = dynavit.from_config(ViTConfig(**SMALL), seed=2)
    with pytest.raises(dynavit.DynavitError, match="other weights"):
        other.load_calibration(tmp_path / "cal")
    with pytest.raises(dynavit.DynavitError, match="cannot read calibration"):
        other.load_calibration(tmp_path / "nothing-here")


def test_recalibration_composes_relative_to_original(small_and_images):
    dm, imgs = small_and_images
    dm.calibrate(imgs[:12], criterion="magnitude", batch_size=6)
    dm.calibrate(imgs[12:], criterion="taylor", batch_size=6)
    fresh = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    fresh.module.permute(dm.calibration.perms)
    for a, b in zip(fresh.module.parameters(), dm.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_swin_calibration_permutes_heads_with_their_position_bias():
    from transformers import SwinConfig

    dm = dynavit.from_config(SwinConfig(embed_dim=32, depths=[2, 2], num_heads=[2, 4], image_size=64, window_size=4))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = dm(x)
    cal = dm.calibrate(torch.randn(12, 3, 64, 64), criterion="magnitude", batch_size=6)
    with torch.no_grad():
        after = dm(x)
    assert float((after - before).norm() / before.norm()) <= 1e-5
    assert any(not torch.equal(p, torch.arange(len(p))) for p in cal.perms["heads"])  # something was reordered


def test_segformer_calibration_reorders_decoder_channels_too():
    from dynavit.models.configs import segformer_config

    dm = dynavit.from_config(segformer_config("b0", num_labels=5))
    head = dm.reference.decode_head
    with torch.no_grad():  # the random init zeroes parts of the head: make every decoder tensor matter
        for t in (head.batch_norm.running_mean, head.batch_norm.running_var, head.batch_norm.weight):
            t.copy_(torch.rand_like(t) + 0.5)
        head.batch_norm.bias.normal_(0, 0.1)
        head.classifier.weight.normal_(0, 0.05)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = dm(x)
    cal = dm.calibrate(torch.randn(8, 3, 64, 64), criterion="magnitude", batch_size=4)
    with torch.no_grad():
        after = dm(x)
    assert float((after - before).norm() / before.norm()) <= 1e-5
    assert set(cal.perms) == {"mlp", "heads", "branch", "fuse"} and len(cal.perms["branch"]) == 4
    assert not torch.equal(cal.perms["fuse"][0], torch.arange(256))
    # after reordering, the first decoder channels are the ones the criterion ranks highest
    from dynavit.importance import scores as _scores

    scores = _scores(dm, [torch.randn(4, 3, 64, 64)], "magnitude")
    assert scores["fuse"][0][:64].mean() > scores["fuse"][0][-64:].mean()
    assert scores["branch"][0][:64].mean() > scores["branch"][0][-64:].mean()


def test_fingerprint_does_not_depend_on_the_thread_count(small_and_images):
    """A calibration saved by a 2-thread process must load in a 1-thread one (float32 sums differ with threads)."""
    from dynavit.calibrate import _param_hash, _same_weights, fingerprint

    big = torch.nn.Linear(1024, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = fingerprint(big)
        torch.set_num_threads(1)
        assert fingerprint(big) == two and two.startswith("v2:")
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # restored
    dm, _ = small_and_images
    assert _same_weights(dm.module, fingerprint(dm.module))
    assert _same_weights(dm.module, _param_hash(dm.module, torch.float32, 2))  # saved before v2, 2 threads
    other = dynavit.from_config(ViTConfig(**SMALL), seed=2)
    assert not _same_weights(other.module, fingerprint(dm.module))
