"""Token-focused MLP width: the class token and the patch tokens it reads most keep every channel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig

import dynavit
from dynavit.compensation import FOCUS, choose_focus, install_focus
from dynavit.config import ExecConfig
from dynavit.cost.flops import macs_per_image
from dynavit.deploy.slice import path_module
from dynavit.knobs import compensate
from dynavit.knobs.focus import focused_mlp, fraction, split
from dynavit.knobs.width import mlp

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=4, num_labels=10)  # 65 tokens


@pytest.mark.parametrize("t", [5, 50, 65, 197, 785])
@pytest.mark.parametrize("n", [128, 768, 3072])
def test_the_split_never_costs_more_than_uniform_width(t, n):
    for k in range(1, n, max(1, n // 37)):
        for f in (0.0, 0.08, 0.16, 0.25, 0.5):
            parts = split(t, k, n, f)
            if parts is None:
                continue
            m, narrow = parts
            assert 0 <= m <= round(f * (t - 1)) and narrow >= max(1, k // 2)
            assert (1 + m) * n + (t - 1 - m) * narrow + (t + 1) // 2 <= t * k  # MLP + the CLS attention
    assert split(t, n, n, 0.16) is None  # full width: nothing to focus


def test_focused_tokens_run_the_full_mlp_and_the_others_the_narrow_one():
    g = torch.Generator().manual_seed(0)
    fc1, fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    x = torch.randn(3, 21, 16, generator=g)
    att = torch.rand(3, 20, generator=g).softmax(-1)
    m, narrow = split(21, 40, 64, 0.25)
    out = focused_mlp(x, fc1, fc2, 40, F.gelu, att, 0.25)
    full, thin = mlp(x, fc1, fc2, 64, F.gelu), mlp(x, fc1, fc2, narrow, F.gelu)
    top = att.topk(m, dim=1).indices + 1
    for b in range(3):
        wide = {0, *top[b].tolist()}
        for i in range(21):
            assert torch.allclose(out[b, i], (full if i in wide else thin)[b, i], atol=1e-6)


@pytest.fixture()
def focused():
    dm = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    dm.calibrate(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3)), batch_size=8)
    comp = dm.calibration.compensation
    comp.focus = ((1.0, 0.16),)
    comp.install(dm.module)
    return dm


def _run(dm, x, cfg):
    dm.configure(cfg)
    with torch.no_grad():
        return dm(x)


def test_focused_paths_count_no_more_macs_than_uniform_width(focused):
    dm, x = focused, torch.randn(1, 3, 32, 32)
    for w in (0.25, 0.5, 0.75, 0.9):
        macs = {}
        for f in (None, 0.16):
            install_focus(dm.module, None if f is None else ((1.0, f),))
            dm.configure(ExecConfig(mlp_width=w))
            with torch.no_grad():
                macs[f] = sum(macs_per_image(dm.module, x).values())
        assert macs[0.16] <= macs[None]


def test_focus_changes_narrowed_paths_only_and_not_blocks_that_reduce_tokens(focused):
    dm, x = focused, torch.randn(2, 3, 32, 32)
    on = {c: _run(dm, x, c) for c in (ExecConfig(), ExecConfig(mlp_width=0.5), ExecConfig(heads=2))}
    merged = ExecConfig(mlp_width=0.5, token_method="merge", token_r=4, token_layers=(0, 1, 2))
    on[merged] = _run(dm, x, merged)
    install_focus(dm.module, None)
    off = {c: _run(dm, x, c) for c in on}
    for same in (ExecConfig(), ExecConfig(heads=2)):
        assert torch.equal(on[same], off[same])
    assert not torch.allclose(on[ExecConfig(mlp_width=0.5)], off[ExecConfig(mlp_width=0.5)])
    assert torch.equal(on[merged], off[merged])  # every block merges: its scores no longer match its tokens


def test_the_nearest_width_decides_the_fraction():
    table = ((0.25, None), (0.5, 0.0), (0.75, 0.16))
    assert [fraction(table, w) for w in (0.1, 0.3, 0.375, 0.6, 0.7, 0.9)] == [None, None, 0.0, 0.0, 0.16, 0.16]


def test_calibration_chooses_each_widths_fraction_on_its_own_probe_and_saves_it(tmp_path):
    dm = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    dm.calibrate(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)), batch_size=8)
    comp = dm.calibration.compensation
    assert [w for w, _ in comp.focus] == [0.25, 0.5, 0.75]  # the calibration's MLP probes
    for w, f in comp.focus:
        assert comp.comparison[f"focus.{w:g}={f}"] == min(comp.comparison[f"focus.{w:g}={c}"] for c in FOCUS)
    want = {0.25: None, 0.5: 0.08, 0.75: 0.25}
    probes = [ExecConfig(mlp_width=w) for w in want] + [ExecConfig(heads=2)]
    seen = []

    def score(cfgs):  # one MLP probe at a time, lowest where the installed fraction is that width's wanted one
        (cfg,) = cfgs
        table = compensate.focus(dm.module.blocks[0].mlp)
        seen.append((cfg.mlp_width, table))
        return 0.0 if table == ((cfg.mlp_width, want[cfg.mlp_width]),) else 1.0

    choose_focus(comp, dm, probes, score)
    assert comp.focus == tuple(want.items()) and len(seen) == len(want) * len(FOCUS)
    assert all(compensate.focus(b.mlp) == comp.focus for b in dm.module.blocks)
    dm.save_calibration(tmp_path / "cal")
    again = dynavit.from_config(ViTConfig(**SMALL), seed=1)
    again.load_calibration(tmp_path / "cal")
    assert again.calibration.compensation.focus == comp.focus
    assert again.calibration.identity() == dm.calibration.identity()
    x = torch.randn(2, 3, 32, 32)
    for w in (0.5, 0.8):
        assert torch.equal(_run(again, x, ExecConfig(mlp_width=w)), _run(dm, x, ExecConfig(mlp_width=w)))
    comp.focus = ((0.75, 0.16),)
    assert again.calibration.identity() != dm.calibration.identity()


def test_a_focused_path_deploys_with_the_same_outputs(focused):
    dm, x = focused, torch.randn(2, 3, 32, 32)
    for cfg in (ExecConfig(mlp_width=0.5), ExecConfig(mlp_width=0.75, heads=2)):
        want = _run(dm, x, cfg)
        mod = path_module(dm, cfg)
        with torch.no_grad():
            assert torch.allclose(mod(x), want, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
def test_a_focused_path_exports_with_the_same_outputs(focused, tmp_path, fmt):
    from dynavit.deploy.export import export, load_program

    dm, cfg = focused, ExecConfig(mlp_width=0.5)
    path = export(dm, tmp_path / ("p.onnx" if fmt == "onnx" else "p.pt2"), cfg, format=fmt)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        want = _run(dm, x, cfg)
        if fmt == "onnx":
            ort = pytest.importorskip("onnxruntime")
            got = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
                None, {"pixel_values": x.numpy()})[0])
        else:
            got = load_program(path)(x)
        assert torch.allclose(got, want, atol=1e-4)


def test_a_focused_path_derives_at_one_width_with_a_warning(focused, tmp_path):
    from dynavit.deploy.derive import derive

    dm, path, x = focused, ExecConfig(mlp_width=0.5), torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="focused MLPs"):
        folder = derive(dm, path, tmp_path / "v")
    assert "narrows them all alike" in (folder / "README.md").read_text()
    assert compensate.focus(dm.module.blocks[0].mlp) is not None  # the model itself keeps its focus
    install_focus(dm.module, None)
    small = dynavit.load(folder)
    assert small.model.config.intermediate_size == 64
    with torch.no_grad():
        torch.testing.assert_close(small(x), _run(dm, x, path), rtol=1e-4, atol=1e-4)
