"""The menu: a store's paths with the model loaded exactly as its sweep measured it, known by its weights."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LABELS, SIZE, Shapes, tiny_vit

from dynavit.accel.dse import load_store_model
from dynavit.calibrate import pixel_hash
from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.model import load
from dynavit.multiplex import build, save_multiplexer
from dynavit.runtime import Controller, Menu
from dynavit.runtime.startup import _probe, start
from dynavit.runtime.timing import PROFILE_IMAGES
from dynavit.sweep import ResultStore, SweepTarget, run_sweep, stats
from dynavit.sweep.measured import model_fingerprint
from dynavit.sweep.row import config_key, pack
from dynavit.train.supervised import export


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict[str, Path]:
    """A tiny ViT swept with a multiplexed model attached (mux=2 paths), and another ViT's weights."""
    root = tmp_path_factory.mktemp("menu")
    export(tiny_vit(seed=0), root / "vit", {"name": "tiny"})
    export(tiny_vit(seed=1), root / "other", {"name": "tiny, other weights"})
    save_multiplexer(build(load(root / "vit"), "concatplexer", 2).eval(), root / "mux")
    data = Shapes(10)
    for i in range(len(data)):
        img, y = data.load(i)
        (root / "data" / f"c{y}").mkdir(parents=True, exist_ok=True)
        img.save(root / "data" / f"c{y}" / f"{i}.png")
    target = SweepTarget(model=str(root / "vit"), data=str(root / "data"), multiplexers=(str(root / "mux"),),
                         batch_size=4, n_boot=50, latency_repeats=2)
    run_sweep(target, space={"mux": [1, 2], "mlp_width": [1.0, 0.5]}, strategy="grid", store=root / "r.db",
              progress=False)
    return {"store": root / "r.db", "vit": root / "vit", "other": root / "other", "mux": root / "mux"}


def test_a_store_swept_with_mux_paths_loads_with_its_multiplexed_model(swept) -> None:
    with ResultStore(swept["store"], readonly=True) as rs:
        recorded = rs.meta["model_fingerprint"]
        cheapest = min(rs.rows(per_image=False), key=lambda r: r.macs).config
    assert " mux2:" in recorded  # the sweep's identity covers the multiplexed model
    assert cheapest == ExecConfig(mux=2)  # so it is on the front by MACs
    menu = Menu.from_store(swept["store"], cost="macs")
    assert 2 in menu.model.multiplexers and model_fingerprint(menu.model) == recorded
    assert ExecConfig(mux=2) in {e.config for e in menu}
    e = next(e for e in menu if e.config == ExecConfig(mux=2))
    assert e.latency_p50_ms > 0 and e.latency_p95_ms >= e.latency_p50_ms and e.quality_lo <= e.quality <= e.quality_hi
    with torch.no_grad():
        assert menu.model.configure(mux=2)(torch.zeros(4, 3, SIZE, SIZE)).shape == (4, LABELS)
    assert menu.images().n == 10  # the sweep's own images, decoded for the menu's model
    # `dynavit accel` loads the store's model the same way: not refused for its mux paths
    assert 2 in load_store_model(swept["store"]).multiplexers
    ctrl = Controller(menu)
    assert ctrl.model is menu.model and ctrl.select(gmacs=e.gmacs).config == ExecConfig(mux=2)


def test_a_store_refuses_a_model_whose_weights_differ(swept) -> None:
    for model in (str(swept["other"]), load(swept["other"])):  # another model, by folder or loaded
        with pytest.raises(DynavitError, match=r"was measured on .* \(weights .*\), not on .*rows do not hold"):
            Menu.from_store(swept["store"], model)
    with pytest.raises(DynavitError, match="was measured on"):
        load_store_model(swept["store"], str(swept["other"]))
    # the same base weights without the multiplexed model the mux=2 rows were measured on
    with pytest.raises(DynavitError, match="was measured on"):
        Menu.from_store(swept["store"], load(swept["vit"]))
    bare = load(swept["vit"])
    bare.add_multiplexer(swept["mux"])
    assert Menu.from_store(swept["store"], bare).model is bare  # a loaded model as measured is taken as it is


def test_a_target_loads_its_variants_and_they_are_part_of_the_fingerprint(swept) -> None:
    target = SweepTarget(model=str(swept["vit"]), data="unused", variants={"other": str(swept["other"])})
    dm = target.load_model()
    assert set(dm.variants) == {"other"}
    fp = model_fingerprint(dm)
    assert " variant:other:" in fp and fp.startswith(model_fingerprint(load(swept["vit"])))


def test_a_store_without_results_is_refused(tmp_path) -> None:
    with ResultStore(tmp_path / "empty.db") as rs:
        rs.bind({"model": "m", "model_fingerprint": "f", "calibration": "none", "dataset_fingerprint": "d",
                 "task": "classification", "metric": "top1", "protocol": {}})
    with pytest.raises(DynavitError, match="no results yet"):
        Menu.from_store(tmp_path / "empty.db")
    with pytest.raises(DynavitError, match="no results yet"):
        Menu.read(tmp_path / "empty.db")


def _rigged(swept, root: Path) -> tuple[Path, dict[str, ExecConfig], np.ndarray, np.ndarray]:
    """A copy of the swept store whose rows rank one way on the menu half of the images and another on the
    frame half: X, Y and FULL are the front on all the images, X and FULL on the menu half."""
    store = root / "rigged.db"
    with ResultStore(swept["store"], readonly=True) as rs:
        cfgs = sorted((r.config for r in rs.rows(per_image=False)), key=lambda c: (c.is_default, config_key(c)))
        n = len(rs.rows()[0].per_image)
    shutil.copy(swept["store"], store)
    menu_idx, frame_idx = stats.split_images(n)  # the split startup.start makes (seed 0, half)
    roles = dict(zip(("X", "Y", "FULL"), cfgs, strict=True))  # FULL: the default path
    on_menu = {"X": [1, 1, 1, 1, 0], "Y": [1, 0, 0, 0, 0], "FULL": [1] * 5}
    on_frames = {"X": [0] * 5, "Y": [1] * 5, "FULL": [1] * 5}
    p95 = {"X": 1.0, "Y": 2.0, "FULL": 4.0}
    with sqlite3.connect(store) as db:
        for name, cfg in roles.items():
            hits = np.zeros((n, 2), np.uint8)
            hits[menu_idx, 0], hits[frame_idx, 0] = on_menu[name], on_frames[name]
            db.execute("UPDATE results SET per_image = ?, quality = ?, latency_p95_ms = ? WHERE config_key = ?",
                       (pack(hits), float(hits[:, 0].mean()), p95[name], config_key(cfg)))
    return store, roles, menu_idx, frame_idx


def test_a_menu_read_on_some_images_is_chosen_and_scored_on_those_only(swept, tmp_path) -> None:
    store, roles, menu_idx, frame_idx = _rigged(swept, tmp_path)
    assert len(menu_idx) == len(frame_idx) == 5
    everything = Menu.read(store)
    assert [e.config for e in everything] == [roles["X"], roles["Y"], roles["FULL"]]
    menu = Menu.read(store, images=menu_idx)
    assert [e.config for e in menu] == [roles["X"], roles["FULL"]]  # Y is dominated there
    assert [e.quality for e in menu] == pytest.approx([0.8, 1.0])
    assert all(e.quality_lo <= e.quality <= e.quality_hi for e in menu)
    assert menu.entries[0].quality_hi < 1  # its interval is the menu half's (4 of 5), not all the images'
    assert [e.config for e in Menu.read(store, images=frame_idx)] == [roles["X"], roles["Y"]]  # Y: 1.0 there
    with pytest.raises(DynavitError, match="image positions"):
        Menu.read(store, images=[0, 10])


def test_start_chooses_the_menu_on_the_menu_half_without_the_frames(swept, tmp_path) -> None:
    store, roles, menu_idx, frame_idx = _rigged(swept, tmp_path)
    s = start(store, images=True, profile_runs=0, rescue=False)
    assert [e.config for e in s.menu] == [roles["X"], roles["FULL"]]  # not Y, which won on the frames
    assert [e.config for e in s.controller.entries] == [roles["X"], roles["FULL"]]
    assert [e.quality for e in s.menu] == pytest.approx([0.8, 1.0])
    assert s.data.n == len(menu_idx) and s.frames.n == len(frame_idx) and s.images["overlap"] == 0
    assert s.held_out_of(roles["Y"]) == pytest.approx(1.0)  # the frames score, from the store's frame-half results
    probe = _probe(s)  # the start-up profile times on menu images, never on the frames
    assert len(probe) == min(PROFILE_IMAGES, s.data.n) > 1
    hashes = [pixel_hash(x) for x in probe]
    assert set(hashes) <= set(s.images["menu_images"]) and not set(hashes) & set(s.images["frame_images"])
