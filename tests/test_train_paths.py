"""Weight-shared path training and SaiT dense/sparse training: they learn, resume exactly, refuse bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LABELS, Shapes, tiny_vit

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.knobs.tokens import recording_cls_attention
from dynavit.model import DynamicModel
from dynavit.sweep.space import build_space
from dynavit.train.distill import Distill, attention_kd, kd_loss
from dynavit.train.loop import Recipe
from dynavit.train.paths import default_token_layers, space_paths, token_paths, train_paths
from dynavit.train.supervised import train_supervised

RECIPE = Recipe(steps=6, batch_size=6, lr=2e-3, warmup=2, crop=(16, 16), seed=5, checkpoint_every=3)
SPACE = {"mlp_width": [1.0, 0.5], "heads": [None, 1], "skip_mlp": [(), (2,)]}


def dyn(seed: int = 0, layers: int = 4) -> DynamicModel:
    dm = tiny_vit(seed, layers=layers)
    assert isinstance(dm, DynamicModel)
    return dm


def logits(dm: DynamicModel, x: torch.Tensor, cfg: ExecConfig = ExecConfig()) -> torch.Tensor:
    dm.configure(cfg)
    with torch.no_grad():
        out = dm(x)
    dm.configure(ExecConfig())
    return out


def test_kd_loss_is_zero_on_agreement_and_averages_pixels() -> None:
    s = torch.randn(4, 5)
    assert kd_loss(s, s, 2.0).abs() < 1e-6
    t = torch.randn(4, 5)
    assert kd_loss(s, t, 1.0) > 0
    # segmentation logits (B, C, H, W): the mean over pixels of the per-pixel KL
    s4, t4 = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    per_pixel = [kd_loss(s4[:, :, i, j], t4[:, :, i, j], 1.0) for i in range(3) for j in range(3)]
    assert torch.allclose(kd_loss(s4, t4, 1.0), torch.stack(per_pixel).mean(), atol=1e-6)
    a = torch.softmax(torch.randn(3, 7), 1)
    assert attention_kd(a, a).abs() < 1e-6 and attention_kd(a.flip(1), a) > 0


def test_path_sets() -> None:
    dm = dyn()
    paths = space_paths(build_space(SPACE, dm.space), n_random=2)
    assert paths.smallest == ExecConfig(mlp_width=0.5, heads=1, skip_mlp=(2,))
    drawn = paths.draw(np.random.default_rng(0))
    assert len(drawn) == 3 and drawn[0] == paths.smallest and all(not c.is_default for c in drawn)
    sait = token_paths([0.7, 0.5], [1, 2])
    assert sait.smallest == ExecConfig(token_method="prune", token_keep=0.5, token_layers=(1, 2))
    assert sait.token_layers == (1, 2)
    assert default_token_layers(12) == (2, 5, 8)
    with pytest.raises(DynavitError, match="densities"):
        token_paths([1.0], [1])


def test_recording_cls_attention_collects_every_layer_with_its_graph() -> None:
    dm = dyn()
    x = torch.randn(2, 3, 16, 16)
    with recording_cls_attention(dm.module) as rec:
        dm(x)
    assert len(rec) == 4 and all(r.shape == (2, 16) for r in rec)
    total = rec[0].sum(1)  # a softmax row over CLS + 16 patches, with CLS's own share left out
    assert ((total > 0.5) & (total < 1.0)).all()
    assert rec[0].requires_grad
    with torch.no_grad():
        dm(x)
    assert len(rec) == 4  # recording stopped with the context


@pytest.mark.parametrize("mode", ["paths", "sait"])
def test_resumed_run_repeats_the_uninterrupted_losses(mode, tmp_path) -> None:
    def run(out, stop_after=None):
        dm = dyn()
        paths = (space_paths(build_space(SPACE, dm.space)) if mode == "paths" else token_paths([0.75, 0.5], [0, 1]))
        return train_paths(dm, Shapes(), out, RECIPE, paths, token_distill=1.0 if mode == "sait" else 0.0,
                           progress=False, stop_after=stop_after)

    whole = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_after=3)
    rest = run(tmp_path / "b")
    assert rest.resumed_from == 3 and len(first.losses) == 3 and len(rest.losses) == 3
    assert np.allclose(first.losses + rest.losses, whole.losses, rtol=1e-5, atol=1e-6)


def test_paths_training_brings_the_small_paths_to_the_default_path(tmp_path) -> None:
    """Against a control trained as long on the default path alone, the smallest path agrees far better."""
    data = Shapes(60)
    warm = Recipe(steps=30, batch_size=10, lr=3e-3, warmup=3, crop=(16, 16))
    more = Recipe(steps=20, batch_size=10, lr=2e-3, warmup=3, crop=(16, 16), seed=1)
    x = torch.stack([torch.from_numpy(np.asarray(data.load(i)[0], np.float32) / 255).permute(2, 0, 1)
                     for i in range(len(data))])
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.labels)
    small = ExecConfig(mlp_width=0.5, heads=1, skip_mlp=(2,))
    gaps, accuracy = {}, {}
    for arm in ("control", "paths"):
        dm = dyn()
        train_supervised(dm, data, tmp_path / arm / "warm", warm, progress=False)
        if arm == "control":
            train_supervised(dm, data, tmp_path / arm / "more", more, progress=False)
        else:
            train_paths(dm, data, tmp_path / arm / "more", more, space_paths(build_space(SPACE, dm.space)),
                        progress=False)
        gaps[arm] = float(kd_loss(logits(dm, x, small), logits(dm, x), 1.0))
        accuracy[arm] = float((logits(dm, x).argmax(1) == y).float().mean())
    assert gaps["paths"] < 0.5 * gaps["control"]
    assert accuracy["paths"] > 1.5 / LABELS and accuracy["control"] > 1.5 / LABELS


def test_label_free_training_keeps_the_default_path(tmp_path) -> None:
    dm = dyn()
    x = torch.randn(8, 3, 16, 16)
    original = logits(dm, x)
    res = train_paths(dm, Shapes(), tmp_path, RECIPE, token_paths([0.5], [1]),
                      distill=Distill(temperature=1.0, use_labels=False), progress=False)
    assert len(res.losses) == RECIPE.steps
    changed = logits(dm, x)
    assert not torch.equal(changed, original)  # the weights did move
    assert (changed.argmax(1) == original.argmax(1)).float().mean() >= 0.75  # but the default path stays close


def test_default_path_loss_mixes_the_anchor_and_the_labels(tmp_path) -> None:
    """(1 - w) * KD(model as loaded) + w * CE: at the first step the anchor's KD is 0 (the default path *is*
    the model as loaded) and the other paths' terms are the same in every arm, so the first loss is linear in w."""
    one = Recipe(steps=1, batch_size=6, lr=2e-3, warmup=1, crop=(16, 16), seed=5)

    def first_loss(name: str, distill: Distill, default_weight: float = 1.0) -> float:
        res = train_paths(dyn(), Shapes(), tmp_path / name, one, token_paths([0.5], [1]), distill=distill,
                          default_weight=default_weight, progress=False)
        return res.losses[0]

    free = first_loss("free", Distill(1.0, use_labels=False))
    labels_only = first_loss("ce", Distill(1.0, label_weight=1.0))
    assert first_loss("w0", Distill(1.0, label_weight=0.0)) == pytest.approx(free, rel=1e-5)
    assert first_loss("half", Distill(1.0, label_weight=0.5)) == pytest.approx((free + labels_only) / 2, rel=1e-5)
    assert labels_only > free + 0.5  # cross-entropy of a random model on 5 classes is ~1.6
    ce = labels_only - free
    assert first_loss("dw3", Distill(1.0, label_weight=1.0), default_weight=3) == pytest.approx(free + 3 * ce, rel=1e-5)
    with pytest.raises(DynavitError, match="must be positive"):
        first_loss("dw0", Distill(1.0), default_weight=0)


def test_bad_path_training_input(tmp_path) -> None:
    dm = dyn()
    with pytest.raises(DynavitError, match="no images"):
        train_paths(dm, Shapes(0), tmp_path, RECIPE, token_paths([0.5], [1]), progress=False)
    other = Shapes()
    other.num_classes = LABELS + 1
    with pytest.raises(DynavitError, match="--no-labels"):
        train_paths(dm, other, tmp_path, RECIPE, token_paths([0.5], [1]), progress=False)
    # label-free training ignores the dataset's classes
    train_paths(dm, other, tmp_path / "free", RECIPE, token_paths([0.5], [1]),
                distill=Distill(use_labels=False), progress=False, stop_after=1)
    with pytest.raises(DynavitError, match="before the last block"):
        train_paths(dm, Shapes(), tmp_path, RECIPE, token_paths([0.5], [3]), token_distill=1.0, progress=False)
    bad = space_paths(build_space({"mlp_width": [1.0, 0.5]}, dm.space))
    object.__setattr__(bad, "smallest", ExecConfig(heads=5))
    with pytest.raises(DynavitError, match="heads"):
        train_paths(dm, Shapes(), tmp_path / "bad", RECIPE, bad, progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


@pytest.mark.parametrize("mode", ["paths", "sait"])
def test_train_command_paths_and_sait(mode, tmp_path) -> None:
    """``dynavit train --mode paths|sait``: scores before and after, exports a model that loads back."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    import dynavit
    from dynavit.cli import app
    from dynavit.train.supervised import export

    data = Shapes(30)
    for split, idx in (("train", range(0, 30, 2)), ("val", range(1, 30, 2))):
        for i in idx:
            folder = tmp_path / split / f"c{data.labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.arrays[i]).save(folder / f"{i}.png")
    export(dyn(), tmp_path / "model", {"name": "tiny"})
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    extra = (["--space", str(space)] if mode == "paths" else
             ["--densities", "0.75,0.5", "--token-layers", "1", "--default-weight", "3"])
    res = CliRunner().invoke(app, ["train", str(tmp_path / "model"), "--mode", mode, "--data", str(tmp_path / "train"),
                                   "--eval-data", str(tmp_path / "val"), "--out", str(tmp_path / "run"), "--steps", "3",
                                   "--batch-size", "4", "--no-labels", *extra])
    assert res.exit_code == 0, res.output
    assert "default path" in res.output and "smallest path" in res.output and "before" in res.output
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "held-out smallest path" in card and "labels not used" in card
    assert f"**default path loss weight**: {3 if mode == 'sait' else 1} x each other path's" in card
    assert dynavit.load(tmp_path / "run" / "model").num_labels == LABELS


def test_unlabelled_folder_trains_label_free_and_is_refused_otherwise(tmp_path) -> None:
    from PIL import Image

    from dynavit.data import UnlabelledImages, open_dataset
    from dynavit.train.supervised import train_supervised

    data = Shapes(8)
    for i in range(8):  # photos at two depths, no class structure, no labels
        folder = tmp_path / "photos" / ("a" if i < 4 else "") / ""
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.arrays[i]).save(folder / f"{i}.jpg")
    (tmp_path / "photos" / "a" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path / "photos")
    assert isinstance(ds, UnlabelledImages) and len(ds) == 8 and ds.task == "unlabelled"
    assert ds.load(0)[1] == -1
    dm = dyn()
    res = train_paths(dm, ds, tmp_path / "run", RECIPE, token_paths([0.5], [1]),
                      distill=Distill(use_labels=False), progress=False, stop_after=2)
    assert len(res.losses) == 2
    with pytest.raises(DynavitError, match="--no-labels"):
        train_paths(dm, ds, tmp_path / "run2", RECIPE, token_paths([0.5], [1]), progress=False)
    with pytest.raises(DynavitError, match="has no labels"):
        train_supervised(dm, ds, tmp_path / "run3", RECIPE, progress=False)
    both = UnlabelledImages.from_paths([ds.path(0), ds.path(5)])
    assert len(both) == 2 and both.load(1)[1] == -1


def test_segmentation_paths_train_label_free_over_pixels(assets, tmp_path) -> None:
    """SegFormer paths (decoder width, resolution) distil per pixel; other resolutions are resized to match."""
    from test_train import tiny_segformer

    from dynavit.data import UnlabelledImages

    frames = UnlabelledImages(assets / "camvid" / "val" / "images").subset(range(6))
    dm = tiny_segformer()
    space = build_space({"decoder_width": [1.0, 0.5], "resolution": [None, (32, 64)]}, dm.space)
    recipe = Recipe(steps=2, batch_size=2, lr=1e-3, warmup=1, crop=(64, 80), seed=1)
    res = train_paths(dm, frames, tmp_path, recipe, space_paths(space, n_random=1),
                      distill=Distill(temperature=1.0, use_labels=False), progress=False)
    assert len(res.losses) == 2 and all(np.isfinite(res.losses))
    assert dm.exec_config == ExecConfig()  # left on the default path


def test_paths_training_drops_a_calibrated_compensation(tmp_path) -> None:
    """The corrections were solved from the weights as calibrated (here under inference mode, as scoring
    does): training moves those weights, so the paths train without them instead of failing."""
    from dynavit.knobs import compensate

    dm = dyn()
    dm.calibrate(torch.randn(16, 3, 16, 16), batch_size=8)
    assert dm.calibration.compensation is not None and compensate.active(dm.module)
    with torch.inference_mode():
        dm.configure(ExecConfig(mlp_width=0.5))
        dm(torch.randn(2, 3, 16, 16))  # a corrected width solved as an inference tensor
    res = train_paths(dm, Shapes(), tmp_path, RECIPE, space_paths(build_space(SPACE, dm.space)), progress=False)
    assert len(res.losses) == RECIPE.steps
    assert dm.calibration.compensation is None and not compensate.active(dm.module)
