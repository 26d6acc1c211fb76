"""Variants: several models of one family swept into one store, one menu, one controller and server."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Shapes, require, tiny_vit
from PIL import Image
from typer.testing import CliRunner

from dynavit.calibrate import Calibration
from dynavit.cli import app
from dynavit.config import ConfigError, ExecConfig
from dynavit.runtime import Menu
from dynavit.runtime.rescue import drop_order
from dynavit.runtime.startup import start
from dynavit.sweep import ResultStore, SweepTarget, run_sweep
from dynavit.sweep.measured import calibration_identity, load_model, model_fingerprint
from dynavit.sweep.space import build_space
from dynavit.sweep.variants import VariantSpace, variant_names
from dynavit.train.supervised import export

SPACE = {"mlp_width": [1.0, 0.5], "skip_blocks": [0, 1]}


def _biased(dm, label: int):
    """A model whose head always answers ``label``: qualities that order the front deterministically."""
    with torch.no_grad():
        dm.reference.classifier.bias.zero_()
        dm.reference.classifier.bias[label] = 50.0
    return dm


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict[str, Path]:
    """`dynavit sweep big small`: an 8-block ViT (always answers class 0, right on half the images) and a
    narrower 2-block one (always answers class 4, never right) that is strictly cheaper, each calibrated."""
    root = tmp_path_factory.mktemp("variants")
    export(_biased(tiny_vit(seed=0, layers=8), 0), root / "big", {"name": "big"})
    export(_biased(tiny_vit(seed=1, dim=16, layers=2), 4), root / "small", {"name": "small"})
    data = Shapes(30)
    for i in range(len(data)):
        img, y = data.load(i)
        if y < 2:  # classes 0 and 1 only: 6 images each
            (root / "data" / f"c{y}").mkdir(parents=True, exist_ok=True)
            img.save(root / "data" / f"c{y}" / f"{i}.png")
    (root / "space.json").write_text(json.dumps(SPACE))
    runner = CliRunner()
    for name in ("big", "small"):
        res = runner.invoke(app, ["calibrate", str(root / name), "--images", str(root / "data"),
                                  "--out", str(root / f"calib-{name}"), "--limit", "4"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sweep", str(root / "big"), str(root / "small"), "--data", str(root / "data"),
                              "--store", str(root / "r.db"), "--space", str(root / "space.json"), "--strategy",
                              "grid", "--latency-repeats", "2", "--calibration", str(root / "calib-big"),
                              "--calibration", str(root / "calib-small")])
    assert res.exit_code == 0, res.output
    return {"root": root, "store": root / "r.db", "big": root / "big", "small": root / "small",
            "calib-big": root / "calib-big", "calib-small": root / "calib-small", "data": root / "data"}


def test_variant_names_are_unique_folder_or_hub_names() -> None:
    assert variant_names(["/m/deit-small/", "org/deit-small", "timm:vit_tiny", "base"]) == [
        "deit-small", "deit-small-2", "vit_tiny", "base-2"]


def test_one_sweep_measures_every_variants_own_paths_into_one_store(swept) -> None:
    with ResultStore(swept["store"], readonly=True) as rs:
        meta, rows = rs.meta, rs.rows(per_image=False)
    by_variant = {v: [r for r in rows if r.config.variant == v] for v in (None, "small")}
    assert len(by_variant[None]) == 4 and len(by_variant["small"]) == 4 and len(rows) == 8
    small = load_model(str(swept["small"]), calibration=str(swept["calib-small"]))
    big = load_model(str(swept["big"]), calibration=str(swept["calib-big"]))
    # each variant's skip_blocks=1 names its own least important block, by its own calibration
    skipped = {r.config.skip_blocks for r in by_variant["small"]} - {()}
    assert skipped == {(small.calibration.block_order("block")[0],)}
    assert all(r.label.startswith("variant=small") for r in by_variant["small"])
    assert max(r.macs for r in by_variant["small"]) < min(r.macs for r in by_variant[None])
    assert all(r.quality == 0.0 for r in by_variant["small"]) and all(r.quality == 0.5 for r in by_variant[None])
    # the store's identity covers both models' weights and both calibrations
    assert meta["model_fingerprint"] == model_fingerprint(big) + f" variant:small:{model_fingerprint(small)}"
    small_calib = Calibration.load(swept["calib-small"]).identity()
    assert meta["calibration"] == f"{big.calibration.identity()} variant:small:{small_calib}"
    uncalibrated = load_model(str(swept["big"]), calibration=str(swept["calib-big"]),
                              variants={"small": str(swept["small"])})
    assert calibration_identity(uncalibrated) != meta["calibration"]


def test_a_config_a_variant_cannot_run_is_a_config_error(swept, tmp_path) -> None:
    dm = load_model(str(swept["big"]), variants={"small": str(swept["small"])})
    assert dm.plan_for(ExecConfig(skip_blocks=(3,))).blocks[3].attn is False  # the base model has 8 blocks
    dm.configure(variant="small")  # whichever model is active, a config is checked against its own model
    assert len(dm.plan_for(ExecConfig(skip_blocks=(3,))).blocks) == 8 and dm.space.num_blocks == 2
    with pytest.raises(ConfigError, match="variant 'small'.*skip_blocks"):
        dm.plan_for(ExecConfig(variant="small", skip_blocks=(3,)))
    with pytest.raises(ConfigError, match="not loaded"):
        dm.plan_for(ExecConfig(variant="nope"))
    (tmp_path / "deep.json").write_text(json.dumps({"skip_blocks": [0, 4]}))
    runner = CliRunner()
    base = ["sweep", str(swept["big"]), str(swept["small"]), "--data", str(swept["data"]), "--strategy", "grid"]
    res = runner.invoke(app, [*base, "--store", str(tmp_path / "a.db"), "--space", str(tmp_path / "deep.json")])
    assert res.exit_code == 2 and "variant 'small'" in res.output and "outside 0..2" in res.output
    res = runner.invoke(app, [*base, "--store", str(tmp_path / "b.db"), "--calibration", str(swept["calib-big"])])
    assert res.exit_code == 2 and "one per model" in res.output


def test_the_menu_holds_both_variants_and_start_reports_their_memory(swept, caplog) -> None:
    menu = Menu.from_store(swept["store"], cost="macs")
    assert {e.config.variant for e in menu} == {None, "small"}  # both on the front: small is cheaper, big better
    dm = menu.model
    assert dm.variants["small"].calibration is not None and dm.calibration is not None
    held = dm.memory_held()
    assert set(held) == {"base", "small"}
    for name, m in (("base", dm.model), ("small", dm.variants["small"].model)):
        assert held[name]["parameters"] == sum(p.numel() * p.element_size() for p in m.parameters())
        assert held[name]["total"] >= held[name]["parameters"] + held[name]["compensation"] > 0
    assert held["small"]["parameters"] < held["base"]["parameters"]
    with caplog.at_level(logging.INFO, logger="dynavit.runtime.startup"):
        s = start(swept["store"], profile_runs=3, rescue=True)
    assert {e.config.variant for e in s.controller.entries} == {None, "small"}
    assert set(s.memory) == {"base", "small"}
    assert "memory held: base " in caplog.text and ", small " in caplog.text
    # rescue: each variant's paths drop blocks by its own calibration (2 blocks: a quarter is none)
    assert drop_order(s.model, None, "small") == s.model.variants["small"].calibration.block_order("block")
    assert all(len(e.ladder) == (0 if e.config.variant else 2) for e in s.controller.entries if e.shares)
    x = s.model.example_input()
    cheapest = min(s.controller.entries, key=lambda e: e.gmacs)
    out = s.controller.run(x, gmacs=cheapest.gmacs)
    assert out.choice.config.variant == "small" and out.output.argmax(-1).item() == 4
    best = s.controller.run(x, gmacs=1e9)
    assert best.choice.config.variant is None and best.output.argmax(-1).item() == 0


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_the_server_answers_on_each_variant_and_exports_memory(swept) -> None:
    require("fastapi")
    from fastapi.testclient import TestClient

    from dynavit.serve.app import create_app

    s = start(swept["store"], profile_runs=3, rescue=False)
    with TestClient(create_app(s.model, s.controller), raise_server_exceptions=False) as client:
        configs = client.get("/v1/configs").json()["configs"]
        seen = set()
        for c in configs:
            r = client.post(f"/v1/infer?config={c['name']}", content=_jpeg(), headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            variant = r.json()["config"]["exec_config"].get("variant")
            assert r.json()["topk"][0]["label"] == s.model.id2label[4 if variant else 0]
            seen.add(variant)
        assert seen == {None, "small"}
        text = client.get("/metrics").text
    for name in ("base", "small"):
        params = s.memory[name]["parameters"]
        assert f'dynavit_model_memory_bytes{{kind="parameters",variant="{name}"}} {float(params)}' in text


def test_accel_costs_and_exports_run_variant_rows_on_the_variants_module(swept, tmp_path) -> None:
    require("onnxruntime")
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(swept["big"]), "--store", str(swept["store"]),
                              "--out", str(tmp_path / "menu")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "menu" / "menu.json").read_text())
    variants = {p["config"].get("variant") for p in meta["paths"]}
    assert variants == {None, "small"} and meta["variants"] == {"small": str(swept["small"])}
    params = {v: [p["parameters"] for p in meta["paths"] if p["config"].get("variant") == v] for v in variants}
    assert max(params["small"]) < min(params[None])  # the small variant's files hold the small model's weights
    from dynavit.deploy.onnxrt import OnnxPaths

    paths = OnnxPaths(tmp_path / "menu")
    for p in meta["paths"]:
        logits = paths.configure(ExecConfig.from_dict(p["config"]))(torch.zeros(1, 3, 16, 16))
        assert int(logits.argmax(-1)) == (4 if p["config"].get("variant") else 0)
    require("zigzag")
    from dynavit.accel.arch import Arch
    from dynavit.accel.dse import cost_store

    costed = cost_store(swept["store"], [Arch.preset("simba-v16")], search="fast", workers=1, progress=False)
    by_variant = {}
    for r, c in costed["simba-v16"]:
        by_variant.setdefault(r.config.variant, []).append(c)
        assert c.macs == r.macs, r.label  # the lowered path is the one measured, on its own model
    assert max(c.energy_uj for c in by_variant["small"]) < min(c.energy_uj for c in by_variant[None])


def test_a_variant_space_composes_each_models_own_knobs(swept) -> None:
    dm = load_model(str(swept["big"]), variants={"small": str(swept["small"])})
    vs = VariantSpace((None, "small"), (build_space({"mlp_width": [1.0, 0.5, 0.25], "heads": [None, 1]}, dm.space),
                                        build_space({"mlp_width": [1.0, 0.5]}, dm.variants["small"].space)))
    assert vs.knob_names == ("mlp_width", "heads") and vs.shape == (2, 3, 2) and vs.size == 12
    assert vs.config((0, 0, 0)) == ExecConfig() and vs.config((1, 0, 0)) == ExecConfig(variant="small")
    assert vs.config((1, 1, 0)) == ExecConfig(variant="small", mlp_width=0.5)
    assert vs.describe((1, 1, 0)) == "variant=small; mlp_width=0.5" and vs.describe((1, 0, 0)) == "variant=small"
    assert vs.config((0, 2, 1)) == ExecConfig(mlp_width=0.25, heads=1)
    for point in ((1, 2, 0), (1, 0, 1)):  # levels the small model's space does not have
        with pytest.raises(ConfigError, match="variant 'small' has"):
            vs.config(point)
    assert json.dumps(vs.to_json())


def test_greedy_and_evolutionary_search_walk_the_variant_dimension(swept, tmp_path) -> None:
    target = SweepTarget(model=str(swept["big"]), data=str(swept["data"]), variants={"small": str(swept["small"])},
                         batch_size=4, n_boot=50, measure_latency=False)
    for strategy, budget in (("greedy", 6), ("evolutionary", 8)):
        s = run_sweep(target, space=SPACE, strategy=strategy, budget=budget, store=tmp_path / f"{strategy}.db",
                      progress=False)
        assert s.invalid == 0 and s.total >= 4
        variants = {r.config.variant for r in s.rows}
        assert variants == {None, "small"}, strategy
        dm = target.load_model()
        for r in s.rows:  # every row is a config of the model it names, priced by that model's size
            plan = dm.plan_for(r.config)
            assert len(plan.blocks) == (2 if r.config.variant else 8)
        assert max(r.macs for r in s.rows if r.config.variant) < min(r.macs for r in s.rows if not r.config.variant)
