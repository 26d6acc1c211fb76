"""A training run killed at any step of a checkpoint save resumes from the newest complete checkpoint.

Each filesystem step of a save reports to ``checkpoint.fault_hook``; a hook that raises there is
a crash at that point. The rerun must continue from the newest checkpoint that was fully written
and compute exactly the losses of a run that was never interrupted, with no manual repair.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Shapes, tiny_vit

from dynavit.errors import DynavitError
from dynavit.train import checkpoint
from dynavit.train.loop import Recipe
from dynavit.train.supervised import train_supervised

RECIPE = Recipe(steps=9, batch_size=4, lr=2e-3, warmup=2, crop=(16, 16), seed=1, checkpoint_every=3)
# every step a save reports, in order; a crash after "manifest-written" has a complete new checkpoint
STEPS = ("tmp-created", "model-written", "optim-written", "state-written", "manifest-written", "current-moved",
         "new-moved", "old-removed")


class Crash(Exception):
    pass


def _train(out: Path, **kw):
    return train_supervised(tiny_vit(), Shapes(12), out, RECIPE, progress=False, workers=1, **kw)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("whole")).losses


def _crash_at(step: str, save_no: int):
    """A hook that raises at ``step`` of the ``save_no``-th save (counting from 1)."""
    seen = {"saves": 0}

    def hook(name: str) -> None:
        if name == "tmp-created":
            seen["saves"] += 1
        if name == step and seen["saves"] == save_no:
            raise Crash(step)
    return hook


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint."))


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_every_step_of_a_save_resumes_from_the_newest_complete_checkpoint(step, whole, tmp_path,
                                                                                   monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "fault_hook", _crash_at(step, 2))  # the save after step 6
    with pytest.raises(Crash):
        _train(tmp_path)
    monkeypatch.setattr(checkpoint, "fault_hook", None)
    expected = 6 if STEPS.index(step) >= STEPS.index("manifest-written") else 3
    assert checkpoint.recover(tmp_path / "checkpoint") == expected
    rest = _train(tmp_path)
    assert rest.resumed_from == expected
    assert rest.losses == whole[expected:]
    assert _leftovers(tmp_path) == []  # stale temporary and old folders are gone
    assert checkpoint.completed_step(tmp_path / "checkpoint") == 9


def test_crash_between_the_renames_keeps_both_checkpoints_until_the_newer_is_in_place(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "fault_hook", _crash_at("current-moved", 2))
    with pytest.raises(Crash):
        _train(tmp_path)
    assert not (tmp_path / "checkpoint").exists()  # the window the old swap lost both checkpoints in
    assert checkpoint.completed_step(tmp_path / "checkpoint.tmp") == 6
    assert checkpoint.completed_step(tmp_path / "checkpoint.old") == 3


def test_repeated_crashes_then_a_clean_finish(whole, tmp_path, monkeypatch) -> None:
    """Crash in the second save, then in the first save of the rerun: nothing is lost either time."""
    monkeypatch.setattr(checkpoint, "fault_hook", _crash_at("old-removed", 2))
    with pytest.raises(Crash):
        _train(tmp_path)
    monkeypatch.setattr(checkpoint, "fault_hook", _crash_at("current-moved", 1))
    with pytest.raises(Crash):
        _train(tmp_path)  # resumed at 6, crashed saving step 9 between the renames
    monkeypatch.setattr(checkpoint, "fault_hook", None)
    rest = _train(tmp_path)
    assert rest.resumed_from == 9 and rest.losses == []
    assert _leftovers(tmp_path) == []


def test_a_damaged_checkpoint_is_named_not_silently_replaced(tmp_path) -> None:
    _train(tmp_path, stop_after=3)
    target = tmp_path / "checkpoint" / "optim.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DynavitError, match="optim.safetensors does not match its manifest"):
        _train(tmp_path)
    assert target.read_bytes() == bytes(data)  # left for the user to look at


def test_a_stale_old_folder_no_longer_blocks_saving(whole, tmp_path) -> None:
    """A checkpoint.old left by a crash used to make every later save fail with 'Directory not empty'."""
    _train(tmp_path, stop_after=3)
    stale = tmp_path / "checkpoint.old"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    rest = _train(tmp_path)
    assert rest.resumed_from == 3 and rest.losses == whole[3:]
    assert _leftovers(tmp_path) == []


_KILLED = """
import os, sys
sys.path.insert(0, {tests!r})
from helpers import Shapes, tiny_vit
from dynavit.train import checkpoint
from dynavit.train.loop import Recipe
from dynavit.train.supervised import train_supervised

saves = []
def hook(name):
    if name == "tmp-created":
        saves.append(name)
    if name == {step!r} and len(saves) == 2:
        os._exit(9)  # no cleanup, no finally blocks: as a kill -9
checkpoint.fault_hook = hook
recipe = Recipe(**{recipe!r})
train_supervised(tiny_vit(), Shapes(12), {out!r}, recipe, progress=False, workers=1)
"""


def test_a_process_killed_mid_save_resumes_exactly(whole, tmp_path) -> None:
    from dataclasses import asdict

    recipe = {**asdict(RECIPE), "crop": list(RECIPE.crop)}
    code = _KILLED.format(tests=str(Path(__file__).parent), step="current-moved", recipe=recipe, out=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr
    rest = _train(tmp_path)
    assert rest.resumed_from == 6 and rest.losses == whole[6:]
    assert _leftovers(tmp_path) == []
