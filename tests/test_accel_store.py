"""`dynavit accel` on a real DeiT-tiny sweep store: costs written back, fronts, controller, DSE, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require
from transformers import ViTConfig

import dynavit
from dynavit.accel.arch import Arch
from dynavit.accel.cost import CostCache
from dynavit.accel.dse import cost_store, design_points, explore, load_store_model
from dynavit.accel.dse_report import markdown_table, write_exploration
from dynavit.accel.lower import lower
from dynavit.config import ExecConfig
from dynavit.runtime import Controller
from dynavit.sweep import ResultStore, SweepTarget, run_sweep, stats
from dynavit.sweep.pareto import cost_of, pareto
from dynavit.sweep.run import measure_configs

require("zigzag")  # the accel extra, part of the dev install: CI fails rather than skips
DYNAVIT = [sys.executable, "-m", "dynavit.cli"]
SPACE = {"heads": [3, 2], "skip_blocks": [[], [10, 11]], "mlp_width": [1.0, 0.6]}


@pytest.fixture(scope="module")
def store(assets, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("accel") / "deit.db"
    target = SweepTarget(model=str(assets / "models" / "deit-tiny-patch16-224"), data=str(assets / "imagenet-samples"),
                         limit=16, batch_size=8, measure_latency=False, n_boot=200)
    run_sweep(target, space=SPACE, strategy="grid", store=path, progress=False)
    return path


@pytest.fixture(scope="module")
def costed(store):
    return cost_store(store, [Arch.preset("simba-v16")], search="fast", workers=2, progress=False)


def test_costs_go_back_into_the_store_and_become_a_pareto_cost(store, costed):
    pairs = costed["simba-v16"]
    with ResultStore(store, readonly=True) as rs:
        rows = rs.rows()
        table = rs.table()
    assert len(pairs) == len(rows) == 12  # 2 x 2 x 2 grid plus heads=3, which is not the default config
    for r in rows:
        c = r.accel["simba-v16"]
        assert c["energy_uj"] > 0 and c["latency_ms"] > 0 and c["design_key"] == Arch.preset("simba-v16").key()
        assert set(c["energy_by_part_uj"]) == {"mac", "buffers", "dram", "vector"}
        assert c["energy_by_part_uj"]["vector"] > 0  # the ops ZigZag leaves at zero are not free here
    assert all("accel_energy_uj:simba-v16" in rec for rec in table)
    front = pareto(rows, "accel_energy_uj:simba-v16", n_boot=100)
    energies = [cost_of(rows_i, "accel_energy_uj:simba-v16") for rows_i in front.menu()]
    assert energies == sorted(energies) and len(front.menu()) >= 2
    ctrl = Controller.from_store(store, cost="accel_energy_uj:simba-v16")
    cheapest = min(e.energy_mj for e in ctrl.entries)
    assert ctrl.select(energy_mj=cheapest * 1.5).entry.energy_mj <= cheapest * 1.5
    assert not ctrl.select(energy_mj=cheapest / 2).budget_met


def test_a_per_image_path_is_costed_on_the_images_its_macs_were_measured_on(store, tmp_path):
    copy = tmp_path / "deit.db"
    shutil.copy(store, copy)
    cfg = ExecConfig(token_method="merge", token_threshold=0.895, token_threshold_step=0.01)
    assert measure_configs(copy, [cfg], latency=False, progress=False) == 1
    (row, cost), = cost_store(copy, [Arch.preset("simba-v16")], configs=[cfg], progress=False)["simba-v16"]
    assert abs(cost.macs / row.macs - 1) < 0.02  # the mean shapes: the attention's N x N counts a little low
    on_noise = lower(load_store_model(copy), cfg).macs  # one random input, as these paths were costed before
    assert abs(on_noise / row.macs - 1) > 0.1


def test_path_costs_obey_physical_bounds(store, costed):
    arch = Arch.preset("simba-v16")
    for _, c in costed["simba-v16"]:
        assert sum(c.energy_pj.values()) >= c.macs * arch.mac_pj
        assert c.mac_cycles >= c.macs / arch.peak_macs_per_cycle
        assert 0 < c.utilization <= 1


def test_strictly_less_work_never_costs_more(assets, store, costed):
    by_cfg = {r.config: c for r, c in costed["simba-v16"]}
    pairs = [(ExecConfig(), ExecConfig(skip_blocks=(10, 11))), (ExecConfig(), ExecConfig(heads=2)),
             (ExecConfig(), ExecConfig(mlp_width=0.6)),
             (ExecConfig(heads=2), ExecConfig(heads=2, mlp_width=0.6, skip_blocks=(10, 11)))]
    for more, less in pairs:
        a, b = by_cfg[more], by_cfg[less]
        assert b.energy_uj <= a.energy_uj and b.latency_ms <= a.latency_ms, (more, less)


def test_cache_makes_a_second_costing_search_nothing(store, costed, tmp_path):
    cache = store.with_name(store.name + ".accel-cache")
    assert cache.is_file()
    cc = CostCache(cache)
    n = len(cc)
    cc.close()
    again = cost_store(store, [Arch.preset("simba-v16")], search="fast", workers=1, progress=False)
    assert len(CostCache(cache)) == n
    assert [c.energy_uj for _, c in again["simba-v16"]] == [c.energy_uj for _, c in costed["simba-v16"]]


def test_design_exploration_rounds_channels_to_the_vector_width(store, tmp_path):
    base = Arch.preset("simba-v16")
    archs = design_points(base, [8, 64])
    assert [a.peak_macs_per_cycle for a in archs] == [base.peak_macs_per_cycle] * 2
    assert [a.name for a in archs] == ["simba-v8", "simba-v64"]
    with ResultStore(store, readonly=True) as rs:
        before = len(rs)
    ex = explore(store, archs, limit=4, search="fast", workers=2, progress=False)
    # mlp_width 0.6 of 768 = 460.8 -> 461 channels at granularity 1, 464 at V=8, 512 at V=64: new paths, measured
    with ResultStore(store, readonly=True) as rs:
        after = rs.rows(per_image=False)
    assert ex.measured_configs >= 1 and len(after) == before + ex.measured_configs
    assert any(r.config.granularity == 64 for r in after)
    for d in ex.designs:
        assert len(d.rows) == 4 and d.rows[d.default()].config.is_default
        s = d.summary(ex.drops)
        assert all(0 <= v["energy_saving"] < 1 for v in s["at_drop"].values())
    out = write_exploration(ex, tmp_path / "dse")
    assert {"dse.json", "dse.md", "dse_fronts.png"} <= {p.name for p in out.iterdir()}
    assert "simba-v64" in markdown_table(ex)


def test_design_exploration_chooses_on_one_half_and_reports_on_the_other(store):
    archs = design_points(Arch.preset("simba-v16"), [16])
    ex = explore(store, archs, limit=6, search="fast", workers=2, drops=(0.0, 0.2), progress=False)
    d = ex.designs[0]
    pick, score = d.split
    assert len(pick) == len(score) == 8 and not set(pick) & set(score)  # 16 images, disjoint halves
    q = [stats.point(r.per_image, "classification") for r in d.rows]
    assert q == [r.quality for r in d.rows]
    for drop, rec in d.summary(ex.drops)["at_drop"].items():
        on_pick = [stats.point(r.per_image[pick], "classification") for r in d.rows]
        q0 = on_pick[d.default()]
        ok = [i for i in range(len(d.rows)) if on_pick[i] >= q0 - float(drop) / 100 - 1e-12]
        i = min(ok, key=lambda i: (d.costs[i].energy_uj, -on_pick[i]))  # chosen on the choosing half only
        assert rec["config"] == d.rows[i].config.to_dict() and not rec["in_sample"]
        held = stats.point(d.rows[i].per_image[score], "classification")
        assert rec["quality"] == held and rec["selected_quality"] == on_pick[i]
        base = stats.point(d.rows[d.default()].per_image[score], "classification")
        assert rec["drop_pts"] == pytest.approx(100 * (base - held))
        lo, hi = rec["delta_ci_pts"]
        assert lo <= -rec["drop_pts"] <= hi and rec["n_score"] == 8
    inside = explore(store, archs, limit=6, search="fast", workers=2, select_share=None, progress=False)
    assert inside.designs[0].split is None
    assert all(a["in_sample"] for a in inside.designs[0].summary(inside.drops)["at_drop"].values())


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_rejects_a_store_of_another_model_and_bad_designs(store, tmp_path):
    other = tmp_path / "other-vit"
    dynavit.from_config(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                  image_size=32, patch_size=8)).reference.save_pretrained(other)
    r = _run([*DYNAVIT, "accel", str(other), "--arch", "simba-v16", "--store", str(store)])
    assert r.returncode == 2 and "was measured on" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: simba-v16\nglobal_buffer_kib: -4\n")
    r = _run([*DYNAVIT, "accel", "-", "--arch", str(bad), "--store", str(store)])
    assert r.returncode == 2 and "global_buffer_kib" in r.stderr
    r = _run([*DYNAVIT, "accel", "-", "--arch", "simba-v99", "--store", str(store)])
    assert r.returncode == 2 and "simba-v99" in r.stderr
    r = _run([*DYNAVIT, "accel", "-", "--arch", "simba-v16", "--store", str(store), "--configs", '[{"heads": 1}]'])
    assert r.returncode == 2 and "no measured row" in r.stderr


def test_cli_costs_and_pareto_reads_the_modelled_cost(store, tmp_path):
    r = _run([*DYNAVIT, "accel", "-", "--arch", "simba-v16", "--store", str(store), "--out", str(tmp_path),
              "--configs", '[{}, {"heads": 2}]'])
    assert r.returncode == 0, r.stderr
    assert "simba-v16" in r.stdout
    dump = json.loads((tmp_path / "accel.json").read_text())["simba-v16"]
    layers = dump[0]["layers"]  # per layer: MAC layers through ZigZag, vector ops through the vector model
    assert {"linear", "attention", "conv", "softmax", "norm"} <= {lay["kind"] for lay in layers}
    assert sum(lay["energy_pj"] for lay in layers) == pytest.approx(dump[0]["energy_uj"] * 1e6, rel=1e-9)
    r = _run([*DYNAVIT, "pareto", str(store), "--cost", "accel_energy_uj:simba-v16"])
    assert r.returncode == 0, r.stderr
    assert "modelled accelerator energy" in r.stdout
    r = _run([*DYNAVIT, "pareto", str(store), "--cost", "accel_energy_uj:nope"])
    assert r.returncode == 2 and "no config" in r.stderr
