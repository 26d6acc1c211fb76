"""Supervised training: it learns, it resumes exactly, its checkpoints are atomic, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynavit.errors import DynavitError
from dynavit.model import from_config
from dynavit.models.configs import segformer_config
from dynavit.train import checkpoint
from dynavit.train.supervised import Recipe, train_supervised


def tiny_segformer(num_labels: int = 11):
    cfg = segformer_config("b0", num_labels=num_labels)
    cfg.depths, cfg.hidden_sizes, cfg.decoder_hidden_size = [1, 1, 1, 1], [8, 16, 24, 32], 32
    cfg.num_attention_heads = [1, 1, 1, 1]
    lm = from_config(cfg, seed=0)
    lm.input_size = (64, 80)
    return lm


@pytest.fixture(scope="module")
def camvid(assets):
    from dynavit.data import open_dataset

    return open_dataset(assets / "camvid" / "train").subset(range(0, 40, 5))


RECIPE = Recipe(steps=6, batch_size=2, lr=2e-3, warmup=2, crop=(48, 64), seed=3, checkpoint_every=3)


def test_resumed_run_repeats_the_uninterrupted_losses(camvid, tmp_path) -> None:
    whole = train_supervised(tiny_segformer(), camvid, tmp_path / "a", RECIPE, progress=False)
    assert len(whole.losses) == 6 and all(np.isfinite(whole.losses))
    first = train_supervised(tiny_segformer(), camvid, tmp_path / "b", RECIPE, progress=False, stop_after=3)
    assert first.losses == whole.losses[:3]
    model = tiny_segformer()  # a fresh process: new model, weights come from the checkpoint
    rest = train_supervised(model, camvid, tmp_path / "b", RECIPE, progress=False)
    assert rest.resumed_from == 3 and rest.losses == whole.losses[3:]
    assert rest.total_seconds > rest.seconds > 0  # the first call's training time carries over
    a = checkpoint.load(tmp_path / "a" / "checkpoint", tiny_segformer().reference)
    assert a["step"] == 6 and a["losses"] == whole.losses


def test_training_lowers_the_loss(camvid, tmp_path) -> None:
    r = Recipe(steps=30, batch_size=4, lr=3e-3, warmup=3, crop=(48, 64), seed=0, checkpoint_every=100)
    res = train_supervised(tiny_segformer(), camvid, tmp_path, r, progress=False)
    assert np.mean(res.losses[-5:]) < 0.8 * np.mean(res.losses[:5])


def test_checkpoint_of_another_run_or_model_is_refused(camvid, tmp_path) -> None:
    train_supervised(tiny_segformer(), camvid, tmp_path, RECIPE, progress=False, stop_after=3)
    other = Recipe(steps=6, batch_size=2, lr=1e-3, warmup=2, crop=(48, 64), seed=3, checkpoint_every=3)
    with pytest.raises(DynavitError, match="another run"):
        train_supervised(tiny_segformer(), camvid, tmp_path, other, progress=False)
    with pytest.raises(DynavitError, match="does not fit this model"):
        checkpoint.load(tmp_path / "checkpoint", from_config(segformer_config("b0", 11), seed=0).reference)
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DynavitError, match="corrupt"):
        train_supervised(tiny_segformer(), camvid, tmp_path, RECIPE, progress=False)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    lm = tiny_segformer()
    opt = torch.optim.AdamW(lm.reference.parameters())
    checkpoint.save(tmp_path / "ck", lm.reference, opt, {"step": 1})
    (tmp_path / "ck.tmp").mkdir()  # what a save killed half-way leaves behind
    assert checkpoint.load(tmp_path / "ck", lm.reference, opt)["step"] == 1
    checkpoint.save(tmp_path / "ck", lm.reference, opt, {"step": 2})
    assert checkpoint.load(tmp_path / "ck", lm.reference)["step"] == 2 and not (tmp_path / "ck.tmp").exists()


def test_bad_training_input(camvid, assets, tmp_path) -> None:
    with pytest.raises(DynavitError, match="num_labels=11"):
        train_supervised(tiny_segformer(num_labels=5), camvid, tmp_path, RECIPE, progress=False)
    from dynavit.data import open_dataset

    imagenet = open_dataset(assets / "imagenet-samples")
    with pytest.raises(DynavitError, match="segmentation model cannot train on a classification"):
        train_supervised(tiny_segformer(), imagenet, tmp_path, RECIPE, progress=False)
    with pytest.raises(DynavitError, match="at least 1"):
        Recipe(steps=0)
    with pytest.raises(DynavitError, match="no images"):
        train_supervised(tiny_segformer(), camvid.subset([]), tmp_path, RECIPE, progress=False)


def test_train_command_exports_a_loadable_model(assets, tmp_path) -> None:
    import os
    import subprocess
    import sys

    import dynavit

    out = tmp_path / "run"
    args = [sys.executable, "-m", "dynavit.cli", "train", "config:segformer-b0", "--data",
            str(assets / "camvid" / "train"), "--eval-data", str(assets / "camvid" / "val"), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--crop", "64", "80", "--input-size", "64", "96"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert "held-out miou" in res.stdout
    card = (out / "model" / "README.md").read_text()
    assert "held-out miou" in card and "recipe" in card and "wall time" in card
    lm = dynavit.load(out / "model")
    assert lm.task == "segmentation" and lm.num_labels == 11 and lm.input_size == (64, 96)
    assert lm.id2label[0] == "Sky"
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)  # resumes: nothing left
    assert again.returncode == 0 and "already trained" in (out / "model" / "README.md").read_text()
    bad = subprocess.run([*args, "--mode", "bogus"], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_half_export_is_half_the_bytes_and_loads_as_fp32(tmp_path) -> None:
    import dynavit
    from dynavit.train.supervised import export

    lm = tiny_segformer()
    lm.input_size = (64, 96)
    export(lm, tmp_path / "fp32", {"name": "tiny"})
    export(lm, tmp_path / "fp16", {"name": "tiny"}, half=True)
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("fp32", "fp16")}
    assert size["fp16"] < 0.55 * size["fp32"]
    back = dynavit.load(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in back.module.parameters())
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = lm(x), back(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-2 * ref.abs().max().item())  # fp16 rounding of the weights only
    assert not torch.equal(got, ref)  # the weights really were rounded
