"""The models committed under ``models/`` load with ``dynavit.load`` and score what their cards say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dynavit

MODELS = Path(__file__).resolve().parents[1] / "models"
COMMITTED = ("segformer-b0-camvid", "segformer-b0-half-camvid")


@pytest.mark.parametrize("name", COMMITTED)
def test_camvid_segformer_loads_and_reproduces_its_card(assets, name) -> None:
    folder = MODELS / name
    weights = folder / "model.safetensors"
    assert weights.is_file(), f"{folder} is missing: it is committed with the repository"
    assert weights.stat().st_size < 10 * 2**20  # the size the repository allows for committed weights
    lm = dynavit.load(folder)
    assert (lm.task, lm.num_labels, lm.input_size) == ("segmentation", 11, (352, 480))
    assert lm.id2label[1] == "Building" and lm.id2label[10] == "Bicyclist"
    assert all(p.dtype == torch.float32 for p in lm.module.parameters())  # stored fp16, runs fp32
    card = (folder / "README.md").read_text()
    assert "command" in card and "recipe" in card and "fp16" in card
    claimed = float(re.findall(r"held-out miou\*\*: ([0-9.]+)", card)[-1])  # the last stage's score
    ev = dynavit.evaluate(lm, assets / "camvid" / "val", progress=False, n_boot=200)
    miou = ev.metrics["miou"]["value"]
    assert abs(miou - claimed) < 0.005, (miou, claimed)  # fp16 weights: the card's number, to rounding
