"""Derived models (a path's structure as a model of its own) and the controller's trace on a segmentation menu."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_vit
from transformers import SegformerConfig

import dynavit
from dynavit.config import ExecConfig
from dynavit.deploy.derive import derive
from dynavit.deploy.slice import DeployError
from dynavit.knobs import compensate
from dynavit.pipeline import Scorer
from dynavit.sweep import stats


def _segformer() -> dynavit.DynamicModel:
    cfg = SegformerConfig(depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 5, 8],
                          decoder_hidden_size=32, num_labels=5)
    dm = dynavit.from_config(cfg, seed=0)
    dm.calibrate(torch.randn(16, 3, 64, 64), batch_size=8)
    return dm


@pytest.mark.filterwarnings("error")  # SegFormer's skipped-block means fold exactly: nothing to warn about
@pytest.mark.parametrize("path", [{"mlp_width": 0.5, "decoder_width": 0.5, "skip_blocks": [1]},
                                  {"mlp_width": 0.75, "skip_blocks": [3, 6]}, {}])
def test_derived_segformer_runs_the_path_it_was_cut_from(path, tmp_path) -> None:
    dm = _segformer()
    x = torch.randn(2, 3, 64, 64)
    dm.configure(ExecConfig.from_dict(path))
    with torch.no_grad():
        expected = dm(x)
    dm.configure()
    folder = derive(dm, path, tmp_path / "small")
    small = dynavit.load(folder)
    conf = json.loads((folder / "config.json").read_text())
    if "skip_blocks" in path:
        assert sum(conf["depths"]) == 8 - len(path["skip_blocks"])
    assert conf["decoder_hidden_size"] == 32 * path.get("decoder_width", 1)
    assert conf["mlp_ratios"] == [round(4 * path.get("mlp_width", 1))] * 4
    assert small.calibration is None and "dynavit derive" in (folder / "README.md").read_text()
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # compensation folded, blocks renumbered
    assert sum(p.numel() for p in small.model.parameters()) <= sum(p.numel() for p in dm.model.parameters())


def test_skipped_blocks_means_fold_into_the_bias_before_them(tmp_path) -> None:
    """A skipped block's mean output: into the previous block's fc2 bias, or the stage's embedding norm."""
    dm = _segformer()
    x = torch.randn(2, 3, 64, 64)
    path = ExecConfig(skip_blocks=(1, 2), mlp_width=0.5)  # block 1 ends stage 0, block 2 starts stage 1
    dm.configure(path)
    with torch.no_grad():
        calibrated = dm(x)
        for i in (1, 2):
            width = dm.model.config.hidden_sizes[dm.module.stage_of[i]]
            for sub in (dm.module.blocks[i].attn, dm.module.blocks[i].mlp):
                compensate.install_skip(sub, torch.linspace(-3.0, 3.0, width)[None])
        expected = dm(x)
    dm.configure()
    scale = float(expected.abs().max())
    assert (expected - calibrated).abs().max() > 0.2 * scale  # the means matter to this path's output
    small = dynavit.load(derive(dm, path, tmp_path / "small"))
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-4 * scale)


def test_derived_vit_keeps_the_calibrated_units_and_blocks(tmp_path) -> None:
    dm = tiny_vit(layers=4)
    dm.calibrate(torch.randn(16, 3, *dm.input_size), batch_size=8)
    assert dm.calibration.compensation.skip_means  # chosen here: a skipped block adds its mean back
    with pytest.warns(UserWarning, match="mean outputs are not carried"):
        folder = derive(dm, {"skip_blocks": [2]}, tmp_path / "means")
    assert "leaves it out" in (folder / "README.md").read_text()
    dm.calibrate(torch.randn(16, 3, *dm.input_size), batch_size=8, compensate=False)
    path = ExecConfig(mlp_width=0.5, skip_blocks=(2,))
    x = torch.randn(2, 3, *dm.input_size)
    dm.configure(path)
    with torch.no_grad():
        expected = dm(x)
    dm.configure()
    small = dynavit.load(derive(dm, path, tmp_path / "v"))
    assert small.model.config.num_hidden_layers == 3
    assert small.model.config.intermediate_size == dm.model.config.intermediate_size // 2
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path, words", [({"heads": 1}, "heads"), ({"precision": "int8"}, "precision"),
                                         ({"skip_attn": [2]}, "one sub-layer"), ({"mlp_width": 0.6}, "whole multiple"),
                                         ({"decoder_branches": [0, 1]}, "decoder branches"),
                                         ({"skip_blocks": [0, 1]}, "every SegFormer stage")])
def test_run_time_only_knobs_are_refused_with_the_reason(path, words, tmp_path) -> None:
    with pytest.raises(DeployError, match=words):
        derive(_segformer(), path, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_derive_cli_needs_a_calibration(tmp_path) -> None:
    from typer.testing import CliRunner

    from dynavit.cli import app

    dm = _segformer()
    dm.calibration = None
    dm.save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(app, ["derive", str(tmp_path / "m"), "--config", '{"mlp_width": 0.5}',
                                   "--out", str(tmp_path / "d")])
    assert res.exit_code != 0 and "--calibration" in res.output


def test_simulate_scores_segmentation_frames_by_pooled_miou(assets, segformer_camvid, tmp_path) -> None:
    """A segmentation menu on a trace: each frame's mask scored like a sweep scores it, pooled over the frames."""
    from dynavit.runtime.simulate import frame_scorer, simulate
    from dynavit.runtime.startup import start
    from dynavit.runtime.traces import make_trace
    from dynavit.sweep.run import SweepTarget, run_sweep

    target = SweepTarget(model=str(segformer_camvid), data=str(assets / "camvid" / "val"), limit=8, batch_size=4,
                         n_boot=50, latency_repeats=3)
    store = tmp_path / "seg.db"
    run_sweep(target, space={"decoder_width": [1.0, 0.5], "resolution": [None, [96, 128]]}, strategy="grid",
              store=store, progress=False)
    s = start(store, profile_runs=3, images=True, rescue=False)
    frames = s.frames.frames()
    assert len(frames) == 4 and not set(s.images["menu_images"]) & set(s.images["frame_images"])
    res = simulate(s.model, s.controller, frames, make_trace("step", 4, 1.0, 1e4), policies=("default", "oracle"),
                   held_out_of=s.held_out_of, score=frame_scorer(s.frames), progress=False)
    default = res.policies["default"].summary()
    assert default["metric"] == "miou" and res.task == "segmentation"
    # each frame ran once on one path (the most accurate one of the menu): the realised mIoU pools the
    # frames' pixel counts
    ran = set(res.policies["default"].executed)
    assert len(ran) == 1
    scorer = Scorer("segmentation", 11, 11, s.frames.ignore_index)
    s.model.configure(ran.pop())
    with torch.no_grad():
        for x, mask in frames:
            scorer.update(s.model(x), [mask])
    assert default["quality"] == pytest.approx(stats.point(scorer.per_image(), "segmentation"))
    assert 0 <= default["held_out_quality"] <= 1  # the path's mIoU on the frame images, batched as a sweep runs
    lo, hi = default["quality_ci"]
    assert lo <= default["quality"] <= hi
    per_frame = np.stack(res.policies["oracle"].scores)
    assert per_frame.shape == (4, 3, 11)
    assert res.policies["oracle"].summary()["quality"] == pytest.approx(stats.point(per_frame, "segmentation"))


def test_training_with_a_teacher_learns_its_outputs_without_labels(assets, tmp_path) -> None:
    """train --teacher --no-labels: the student's outputs move to the teacher's on real images."""
    import torch.nn.functional as F

    from dynavit.data import open_dataset
    from dynavit.train.distill import Distill
    from dynavit.train.loop import Recipe
    from dynavit.train.supervised import train_supervised

    data = open_dataset(assets / "camvid" / "train").subset(range(0, 40, 5))

    def model(seed: int, width: int) -> dynavit.DynamicModel:
        cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1],
                              decoder_hidden_size=width, num_labels=11)
        dm = dynavit.from_config(cfg, seed=seed)
        dm.input_size = (64, 80)
        return dm

    teacher, student = model(1, 32), model(0, 16)
    with torch.no_grad():  # confident outputs: a random model's are near uniform, with nothing to learn
        teacher.model.decode_head.classifier.weight.mul_(30)
    x = torch.stack([teacher.transform(data.load(i)[0]) for i in range(len(data))])

    def gap() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                                  reduction="batchmean"))

    before = gap()
    recipe = Recipe(steps=30, batch_size=4, lr=3e-3, warmup=3, crop=(48, 64), seed=0, checkpoint_every=100)
    res = train_supervised(student, data, tmp_path / "run", recipe, progress=False, teacher=teacher,
                           distill=Distill(temperature=1.0, use_labels=False))
    assert np.mean(res.losses[-5:]) < 0.7 * np.mean(res.losses[:5])
    assert gap() < 0.7 * before
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["identity"]["teacher"]["use_labels"] is False  # a resumed run must distil the same way
