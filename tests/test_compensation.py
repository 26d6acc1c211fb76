"""Compensation: closed-form corrections for removed channels/heads and skipped sub-layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import SegformerConfig, SwinConfig, ViTConfig

import dynavit
from dynavit.calibrate import Calibration
from dynavit.compensation import RIDGES, choose_ridges, ridge_probes
from dynavit.config import ExecConfig
from dynavit.data.datasets import list_images, read_image
from dynavit.knobs import compensate, quant

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, num_labels=10)
PATHS = [ExecConfig(mlp_width=0.5), ExecConfig(heads=2), ExecConfig(skip_attn=(2,)), ExecConfig(skip_blocks=(1,)),
         ExecConfig(mlp_width=0.25, heads=1, token_keep=0.7, token_layers=(1,))]


def kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"))


def run(dm, x: torch.Tensor, cfg: ExecConfig) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        return dm(x)


@pytest.fixture()
def calibrated():
    dm = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    g = torch.Generator().manual_seed(3)
    dm.calibrate(torch.randn(32, 3, 32, 32, generator=g), batch_size=8)
    return dm


def test_matrix_correction_is_exact_when_removed_channels_are_linear_in_kept_ones():
    g = torch.Generator().manual_seed(0)
    kept = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    removed = kept @ torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.5  # affine in the kept ones
    h = torch.cat([kept, removed], 1)
    lin = torch.nn.Linear(9, 5).double()
    mean, cov = h.mean(0), torch.cov(h.T, correction=0)
    exact = lin(h)
    errors = {}
    for method in ("none", "bias", "matrix"):
        stats = compensate.LayerStats(mean, cov, method, ridge=1e-12)
        w, b = (lin.weight[:, :6], lin.bias) if method == "none" else compensate.solve(lin.weight, lin.bias, stats, 6)
        errors[method] = float((F.linear(kept, w, b) - exact).square().mean().detach())
    assert errors["matrix"] < 1e-12 < errors["bias"] < errors["none"]


def test_default_path_is_bit_identical_and_corrections_are_installed(calibrated):
    dm = calibrated
    comp = dm.calibration.compensation
    assert comp is not None and comp.method in compensate.METHODS
    assert set(comp.comparison) >= {"none", "bias", "matrix", "skip_means=True", "skip_means=False"}
    assert comp.method == min(("none", "bias", "matrix"), key=comp.comparison.get)
    x = torch.randn(3, 3, 32, 32)
    dm.configure(ExecConfig())
    with torch.no_grad():
        assert torch.equal(dm(x), dm.reference(pixel_values=x).logits)
    comp.install(dm.module, method="matrix", skip_means=True)
    on = run(dm, x, ExecConfig(mlp_width=0.5))
    comp.install(dm.module, method="none", skip_means=False)
    off = run(dm, x, ExecConfig(mlp_width=0.5))
    assert not torch.allclose(on, off)
    assert torch.equal(run(dm, x, ExecConfig()), dm.reference(pixel_values=x).logits)


def test_switching_paths_solves_each_width_once(calibrated):
    dm = calibrated
    dm.calibration.compensation.install(dm.module, method="matrix", skip_means=True)
    x = torch.randn(2, 3, 32, 32)
    first = [run(dm, x, c) for c in PATHS]
    before = compensate.counts["solved"]
    again = [run(dm, x, c) for c in PATHS * 2]
    assert compensate.counts["solved"] == before
    for a, b in zip(first * 2, again, strict=True):
        assert torch.equal(a, b)
    held = compensate.held_bytes(dm.module)
    assert held["n_solved"] >= 3 and held["statistics"] > 0 and held["solved"] > 0


def test_skipped_sublayer_gets_its_mean_back(calibrated):
    dm = calibrated
    comp = dm.calibration.compensation
    x = torch.randn(2, 3, 32, 32)
    comp.install(dm.module, skip_means=False)
    plain = run(dm, x, ExecConfig(skip_attn=(2,)))
    comp.install(dm.module, skip_means=True)
    assert not torch.equal(run(dm, x, ExecConfig(skip_attn=(2,))), plain)
    mean = comp.skips["attn.2"]
    assert mean.shape == (2, 64)  # CLS token, patch tokens


def test_saved_calibration_restores_the_same_compensated_paths(calibrated, tmp_path):
    dm = calibrated
    x = torch.randn(2, 3, 32, 32)
    want = [run(dm, x, c) for c in PATHS]
    dm.save_calibration(tmp_path / "cal")
    fresh = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    fresh.load_calibration(tmp_path / "cal")
    assert fresh.calibration.identity() == dm.calibration.identity()
    assert fresh.calibration.compensation.method == dm.calibration.compensation.method
    for c, w in zip(PATHS, want, strict=True):
        assert torch.allclose(run(fresh, x, c), w, atol=1e-5)
    dm.save_pretrained(tmp_path / "model")
    again = dynavit.load(tmp_path / "model")
    for c, w in zip(PATHS, want, strict=True):
        assert torch.allclose(run(again, x, c), w, atol=1e-5)
    loaded = Calibration.load(tmp_path / "cal")
    assert loaded.compensation.layers.keys() == dm.calibration.compensation.layers.keys()


def test_each_group_gets_the_ridge_its_own_probes_score_best(calibrated):
    """MLP probes judge the MLPs' ridge, the heads probe the projections'; the choice reaches the solve."""
    dm = calibrated
    comp = dm.calibration.compensation
    comp.method = "matrix"
    probes = [ExecConfig(mlp_width=0.5), ExecConfig(mlp_width=0.75), ExecConfig(heads=2)]
    assert ridge_probes(comp, probes) == {"mlp": probes[:2], "heads": probes[2:]}
    want = {"mlp": RIDGES[1], "heads": RIDGES[-2]}
    seen: list[tuple[str, float]] = []

    def score(cfgs):  # lowest where the installed ridge of the probed group is the wanted one
        g = "heads" if cfgs[0].heads is not None else "mlp"
        r = compensate._layers[dm.module.blocks[0].mlp.fc2 if g == "mlp" else dm.module.blocks[0].attn.o].ridge
        seen.append((g, r))
        return abs(r - want[g])

    choose_ridges(comp, dm, probes, score)
    assert comp.ridges == want and sorted(seen) == sorted((g, r) for g in want for r in RIDGES)
    comp.install(dm.module)
    assert compensate._layers[dm.module.blocks[1].attn.o].ridge == want["heads"]
    assert compensate._layers[dm.module.blocks[2].mlp.fc2].ridge == want["mlp"]
    x = torch.randn(2, 3, 32, 32)
    chosen = run(dm, x, ExecConfig(heads=2))
    comp.ridges["heads"] = RIDGES[0]
    comp.install(dm.module)
    assert not torch.allclose(run(dm, x, ExecConfig(heads=2)), chosen)


def test_calibration_records_its_ridges_and_reloads_them(calibrated, tmp_path):
    comp = calibrated.calibration.compensation
    assert (comp.method == "matrix") == (set(comp.ridges) == {"mlp", "heads"})
    assert (comp.method == "matrix") == bool(comp.ridges)
    for g, r in comp.ridges.items():
        assert comp.comparison[f"ridge.{g}={r:g}"] == min(comp.comparison[f"ridge.{g}={c:g}"] for c in RIDGES)
    comp.ridges = {"mlp": 0.01, "heads": 0.3}
    calibrated.save_calibration(tmp_path / "cal")
    loaded = Calibration.load(tmp_path / "cal").compensation
    assert loaded.ridges == {"mlp": 0.01, "heads": 0.3}
    comp.ridges = {"mlp": 0.01, "heads": 1.0}
    assert Calibration.load(tmp_path / "cal").identity() != calibrated.calibration.identity()


def test_calibrating_without_compensation_leaves_knobs_uncompensated():
    dm = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    cal = dm.calibrate(torch.randn(16, 3, 32, 32), batch_size=8, compensate=False)
    assert cal.compensation is None and not compensate.active(dm.module)


def test_int8_paths_use_the_compensated_weights(calibrated):
    dm = calibrated
    dm.calibration.compensation.install(dm.module, method="matrix")
    x = torch.randn(4, 3, 32, 32)
    fp32 = run(dm, x, ExecConfig(mlp_width=0.5, heads=2))
    packed = quant.counts["packed"]
    int8 = run(dm, x, ExecConfig(mlp_width=0.5, heads=2, precision="int8"))
    assert quant.counts["packed"] > packed
    assert float((int8 - fp32).norm() / fp32.norm()) < 0.1
    dm.calibration.compensation.install(dm.module, method="none")
    assert float((run(dm, x, ExecConfig(mlp_width=0.5, heads=2, precision="int8")) - fp32).norm()) > float(
        (int8 - fp32).norm())


def test_sliced_path_module_folds_the_correction_in(calibrated):
    from dynavit.deploy.slice import path_module

    dm = calibrated
    dm.calibration.compensation.install(dm.module, method="matrix", skip_means=True)
    x = torch.randn(2, 3, 32, 32)
    for cfg in PATHS[:4]:
        want = run(dm, x, cfg)
        mod = path_module(dm, cfg)
        with torch.no_grad():
            assert torch.allclose(mod(x), want, atol=1e-5)


@pytest.mark.parametrize("family", ["swin", "segformer"])
def test_other_families_compensate_width_heads_skips_and_decoder(family):
    if family == "swin":
        cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                         num_labels=5)
        paths = [ExecConfig(mlp_width=0.5), ExecConfig(heads=1), ExecConfig(skip_mlp=(1,))]
    else:
        cfg = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                              hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
                              mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=4)
        paths = [ExecConfig(mlp_width=0.5), ExecConfig(decoder_width=0.5), ExecConfig(skip_attn=(1,))]
    dm = dynavit.from_config(cfg, seed=0)
    x = torch.randn(12, 3, 32, 32)
    dm.calibrate(x, batch_size=4)
    comp = dm.calibration.compensation
    assert {k.split(".")[0] for k in comp.layers} >= ({"mlp", "heads"} | ({"fuse"} if family == "segformer" else set()))
    comp.install(dm.module, method="matrix", skip_means=True)
    on = [run(dm, x[:2], c) for c in [ExecConfig(), *paths]]
    comp.install(dm.module, method="none", skip_means=False)
    off = [run(dm, x[:2], c) for c in [ExecConfig(), *paths]]
    assert torch.equal(on.pop(0), off.pop(0))  # the full path has nothing to correct
    for a, b in zip(on, off, strict=True):
        assert not torch.allclose(a, b)


@pytest.fixture(scope="module")
def deit_48(deit_tiny_path, assets):
    """DeiT-tiny calibrated on 48 ImageNet photos, and 32 others it never saw."""
    photos = list_images(assets / "imagenet-samples" / "images")
    dm = dynavit.load(deit_tiny_path)
    dm.calibrate([read_image(p) for p in photos[::5][:48]], criterion="variance")
    return dm, torch.stack([dm.transform(read_image(p)) for p in photos[2::5][:32]])


def test_compensation_helps_deit_tiny_on_photos_it_never_saw(deit_48):
    """Statistics from 48 ImageNet photos; reduced paths judged on 32 others (KL to the full model)."""
    dm, held = deit_48
    ref = run(dm, held, ExecConfig())
    comp = dm.calibration.compensation
    paths = [ExecConfig(mlp_width=0.75), ExecConfig(mlp_width=0.5), ExecConfig(heads=2)]
    try:
        comp.install(dm.module, method="none", skip_means=False)
        off = [kl(ref, run(dm, held, c)) for c in paths]
        comp.install(dm.module, method="matrix", skip_means=False)
        on = [kl(ref, run(dm, held, c)) for c in paths]
    finally:
        comp.install(dm.module)
    for a, b in zip(on, off, strict=True):
        assert a < 0.8 * b


def test_chosen_heads_ridge_beats_the_default_on_photos_it_never_saw(deit_48):
    """DeiT-tiny's calibration picks the heads' ridge on its held-out quarter; 32 unseen photos confirm it."""
    dm, held = deit_48
    ref = run(dm, held, ExecConfig())
    comp = dm.calibration.compensation
    assert comp.method == "matrix" and comp.ridges["heads"] > RIDGES[0]
    chosen = dict(comp.ridges)
    try:
        on = kl(ref, run(dm, held, ExecConfig(heads=2)))
        comp.ridges = {**chosen, "heads": RIDGES[0]}
        comp.install(dm.module)
        default = kl(ref, run(dm, held, ExecConfig(heads=2)))
    finally:
        comp.ridges = chosen
        comp.install(dm.module)
    assert on < 0.95 * default


def test_composed_skip_orders_beat_single_skip_ranking_on_photos_it_never_saw(deit_48):
    """3 to 6 blocks or sub-layers skipped: the composed orders' choices against those ranked best alone."""
    dm, held = deit_48
    cal = dm.calibration
    ref = run(dm, held, ExecConfig())
    totals = {"single": 0.0, "composed": 0.0}
    for kind, key in (("block", "skip_blocks"), ("attn", "skip_attn"), ("mlp", "skip_mlp")):
        orders = {"single": sorted(range(12), key=cal.block_kl[kind].__getitem__), "composed": cal.block_order(kind)}
        assert orders["single"][:6] != orders["composed"][:6]
        for k in range(3, 7):
            cost = {name: kl(ref, run(dm, held, ExecConfig(**{key: tuple(o[:k])}))) for name, o in orders.items()}
            assert cost["composed"] <= cost["single"] * 1.01 or k < 5, (kind, k, cost)
            totals = {name: totals[name] + cost[name] for name in totals}
    assert totals["composed"] < 0.85 * totals["single"], totals


def test_mac_count_of_a_first_run_excludes_the_one_off_solve(calibrated):
    from dynavit.cost.flops import macs_per_image

    dm = calibrated
    dm.calibration.compensation.install(dm.module, method="matrix")
    x = torch.randn(1, 3, 32, 32)
    cfg = ExecConfig(mlp_width=0.5, heads=3)
    dm.configure(cfg)
    before = compensate.counts["solved"]
    with torch.no_grad():
        first = sum(macs_per_image(dm.module, x).values())  # solves here
        assert compensate.counts["solved"] > before
        again = sum(macs_per_image(dm.module, x).values())
    dm.calibration.compensation.install(dm.module, method="none")
    with torch.no_grad():
        plain = sum(macs_per_image(dm.module, x).values())
    assert first == again == plain


def test_dropped_decoder_branch_is_predicted_from_the_kept_ones():
    from dynavit.compensation import measure
    from dynavit.deploy.slice import path_module

    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                          num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=32, num_labels=4)
    dm = dynavit.from_config(cfg, seed=0)
    x = torch.randn(12, 3, 32, 32)
    dm.calibrate(x, batch_size=4)
    assert {"branch_fix=True", "branch_fix=False"} <= set(dm.calibration.compensation.comparison)
    comp = measure(dm, [x])  # statistics of exactly these images
    dec = dm.module.decoder
    maps: list[torch.Tensor] = []
    hook = dec.fuse.register_forward_hook(lambda m, i, o: maps.append(i[0].clone()))
    full = run(dm, x, ExecConfig())
    hook.remove()
    # the fuse input in its column order (branch 1 first), at the pixels the statistics were taken on
    z = torch.cat(maps[::-1], 1)[:, :, ::2, ::2].movedim(1, -1).reshape(-1, 64).double()
    w_full = dec.fuse.weight.reshape(32, 64).double()
    comp.install(dm.module, method="none", skip_means=False, branch_fix=True)
    w_k, b = compensate.columns(dec.fuse, 32, [range(32, 64)], [range(0, 32)])  # branch 1 dropped
    target = z @ w_full.T
    err_fix = (z[:, 32:] @ w_k.double().T + b.double() - target).square().mean()
    err_mean = (z[:, 32:] @ w_full[:, 32:].T + z[:, :32].mean(0) @ w_full[:, :32].T - target).square().mean()
    assert err_fix < 0.9 * err_mean  # least squares beats adding the dropped branch's mean
    drop1 = ExecConfig(decoder_branches=(0,))
    on = run(dm, x, drop1)
    comp.install(dm.module, method="none", skip_means=False, branch_fix=False)
    assert not torch.allclose(run(dm, x, drop1), on)
    comp.install(dm.module, method="none", skip_means=False, branch_fix=True)
    assert torch.equal(run(dm, x, ExecConfig()), full)  # nothing dropped, nothing corrected
    run(dm, x, drop1)
    solved = compensate.counts["solved"]
    run(dm, x, ExecConfig()), run(dm, x, drop1)
    assert compensate.counts["solved"] == solved  # switching back solves nothing
    for c in (drop1, ExecConfig(decoder_branches=(1,), decoder_width=0.5)):
        want = run(dm, x[:2], c)
        with torch.no_grad():  # the sliced path carries the correction in its weights and batch norm
            assert torch.allclose(path_module(dm, c)(x[:2]), want, atol=1e-5)
