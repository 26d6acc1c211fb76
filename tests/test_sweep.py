"""Sweeps: search spaces, strategies, the result store, the evaluator and Pareto fronts."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from helpers import make_row, require

from dynavit.config import ConfigError, ExecConfig
from dynavit.errors import DynavitError
from dynavit.model import from_config
from dynavit.models.configs import preset_config
from dynavit.sweep import stats
from dynavit.sweep.pareto import best_within, pareto
from dynavit.sweep.space import build_space, load_space
from dynavit.sweep.store import ResultStore, StoreError
from dynavit.sweep.strategies import dominates, fronts, make


@pytest.fixture(scope="module")
def vit_space():
    return from_config(preset_config("vit-t16"), seed=0).space


# ---------------------------------------------------------------------------------------- space


def test_space_expands_sugar_and_puts_default_first(vit_space) -> None:
    s = build_space({"skip_attn": [1, 2], "tokens": [{"token_method": "merge", "token_keep": 0.9,
                                                      "token_layers": "all"}], "resolution": [224, 192]},
                    vit_space, {"skip_attn": [5, 2, 7]})
    assert s.shape == (3, 2, 2)
    assert s.knobs[0].levels == ({}, {"skip_attn": (5,)}, {"skip_attn": (2, 5)})  # calibration order, sorted
    assert s.knobs[1].levels[1]["token_layers"] == tuple(range(12))
    assert s.knobs[2].levels == ({}, {"resolution": (192, 192)})  # 224 is the default: no change
    assert s.config((0, 0, 0)) == ExecConfig()
    assert s.config((2, 1, 1)) == ExecConfig(skip_attn=(2, 5), token_method="merge", token_keep=0.9,
                                             token_layers=tuple(range(12)), resolution=192)
    assert s.describe((0, 1, 1)) == "tokens(method=merge, keep=0.9, layers=all); resolution=192"
    assert s.size == 12


def test_segformer_resolution_levels_keep_the_models_aspect_ratio() -> None:
    from dynavit.models.configs import segformer_config
    from dynavit.sweep.space import preset

    dm = from_config(segformer_config("b0", num_labels=11), seed=0)
    dm.input_size = (352, 480)  # a CamVid model: its default path runs at 352x480, not the config's 512x512
    assert dm.space.default_resolution == (352, 480)
    levels = preset("default", dm.space)["resolution"]
    assert levels[0] == 352 and all(v % 32 == 0 for v in levels)
    s = build_space({"resolution": levels}, dm.space)
    sizes = [lv.get("resolution") for lv in s.knobs[0].levels]
    assert sizes[0] is None  # 352 is the default: no change
    for h, w in sizes[1:]:
        assert h < 352 and w % 32 == 0 and abs(w / h - 480 / 352) < 0.1
    assert (256, 352) in sizes
    x = torch.randn(1, 3, 352, 480)
    dm.configure(s.config((len(sizes) - 1,)))
    with torch.inference_mode():
        assert dm(x).shape[-2:] == (256 // 4, 352 // 4)  # SegFormer logits at 1/4 of the input it ran at


def test_space_without_calibration_skips_the_last_blocks(vit_space) -> None:
    s = build_space({"skip_blocks": [0, 2]}, vit_space)
    assert s.knobs[0].levels[1] == {"skip_blocks": (10, 11)}


@pytest.mark.parametrize("spec, match", [
    ({}, "empty"),
    ({"mlp_width": [1.0]}, "only the default"),
    ({"mlp_width": []}, "no levels"),
    ({"mlp_width": [1.0, 1.5]}, "mlp_width=1.5"),
    ({"heads": [3, 4]}, "heads=4"),
    ({"resolution": [224, 200]}, "multiple of 16"),
    ({"a": [{"mlp_width": 0.5}], "b": [{"mlp_width": 0.7}]}, "both set mlp_width"),
    ({"bogus": [1, 2]}, "not an ExecConfig field"),
    ({"decoder_width": [1.0, 0.5]}, "decoder"),
])
def test_bad_spaces_are_refused_with_the_reason(vit_space, spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_space(spec, vit_space)


def test_presets_are_valid_for_every_family() -> None:
    for name in ("vit-t16", "swin-t", "segformer-b0"):
        space = from_config(preset_config(name), seed=0).space
        for preset in ("default", "small"):
            s = load_space(preset, space)
            assert s.size > 1
            for p in list(s.points())[:: max(1, s.size // 50)]:
                s.config(p)  # every combination builds (validity is checked per level)


def test_space_file_errors(tmp_path, vit_space) -> None:
    bad = tmp_path / "space.json"
    bad.write_text("{not json")
    with pytest.raises(DynavitError, match="not valid JSON"):
        load_space(bad, vit_space)
    with pytest.raises(DynavitError, match="neither a preset"):
        load_space(tmp_path / "missing.json", vit_space)


# ---------------------------------------------------------------------------------------- strategies


def _run(strategy, score):
    """Drive a strategy to the end with a synthetic score function; return proposals in order."""
    seen = []
    while pts := strategy.ask():
        seen += pts
        strategy.tell({p: score(p) for p in pts})
    return seen


def _score(p):  # quality falls and MACs fall with every level; knob 0 is cheap to move
    return (1.0 - 0.01 * p[0] - 0.05 * p[1] - 0.03 * p[2], 100.0 - 10 * p[0] - 12 * p[1] - 5 * p[2])


def test_grid_and_random() -> None:
    assert len(_run(make("grid", (2, 3, 1), None), _score)) == 6
    with pytest.raises(DynavitError, match="more than --budget"):
        make("grid", (4, 4), 5).ask()
    a = _run(make("random", (3, 3, 3), 10, seed=1), _score)
    b = _run(make("random", (3, 3, 3), 10, seed=1), _score)
    assert a == b and len(set(a)) == 10 and a[0] == (0, 0, 0)


def test_greedy_walks_the_least_sensitive_knob_first() -> None:
    g = make("greedy", (4, 4, 4), 14)
    seen = _run(g, _score)
    singles = [(0, 0, 0)] + [tuple(lv if k == j else 0 for k in range(3)) for j in range(3) for lv in (1, 2, 3)]
    assert seen[:10] == singles
    # knob 0 loses 0.001 quality per MAC saved, knob 1 0.0042, knob 2 0.006: the descent moves knob 0
    # first, and from each step measures the moves of the other knobs that are still unknown
    assert len(seen) == 14
    assert seen[10:] == [(1, 1, 0), (1, 0, 1), (2, 1, 0), (2, 0, 1)]


def test_evolutionary_is_deterministic_and_finds_the_front() -> None:
    a = _run(make("evolutionary", (4, 4, 4), 40, seed=3), _score)
    b = _run(make("evolutionary", (4, 4, 4), 40, seed=3), _score)
    assert a == b and len(a) == len(set(a)) == 40
    assert (3, 3, 3) in a and (0, 0, 0) in a  # extremes of the front are seeded


def test_strategy_needs_budget_and_a_space() -> None:
    with pytest.raises(DynavitError, match="needs --budget"):
        make("random", (2, 2), None)
    with pytest.raises(DynavitError, match="only the default"):
        make("grid", (1,), None)
    with pytest.raises(DynavitError, match="unknown strategy"):
        make("annealing", (2,), 3)


def test_non_dominated_sorting() -> None:
    pts = [(0.9, 10), (0.8, 5), (0.85, 10), (0.7, 5), (0.95, 20)]
    assert dominates(pts[0], pts[2]) and not dominates(pts[0], pts[1])
    assert [sorted(f) for f in fronts(pts)] == [[0, 1, 4], [2, 3]]


# ---------------------------------------------------------------------------------------- store


IDENT = {"model": "m", "model_fingerprint": "f", "calibration": "none", "dataset_fingerprint": "d",
         "task": "classification", "metric": "top1", "protocol": {"batch_size": 8}}


def test_store_round_trip_and_export(tmp_path) -> None:
    hits = (np.arange(40).reshape(20, 2) % 3 == 0).astype(np.uint8)
    with ResultStore(tmp_path / "r.db") as rs:
        rs.bind(IDENT)
        rid = rs.add(make_row(ExecConfig(mlp_width=0.5), hits, 2e9))
        assert rs.add(make_row(ExecConfig(mlp_width=0.5), hits, 9e9)) == rid  # stored once
        assert len(rs) == 1
    with ResultStore(tmp_path / "r.db", readonly=True) as rs:
        r = rs.get(ExecConfig(mlp_width=0.5))
        assert r.macs == 2e9 and np.array_equal(r.per_image, hits) and r.config == ExecConfig(mlp_width=0.5)
        csv = rs.export(tmp_path / "r.csv").read_text().splitlines()
        assert len(csv) == 2 and "macs_linear" in csv[0] and "top1" in csv[0]
        pq = require("pyarrow.parquet")
        assert pq.read_table(rs.export(tmp_path / "r.parquet")).num_rows == 1
        with pytest.raises(DynavitError, match="csv or .parquet"):
            rs.export(tmp_path / "r.xlsx")


def test_store_refuses_another_experiment_and_names_the_difference(tmp_path) -> None:
    with ResultStore(tmp_path / "r.db") as rs:
        rs.bind(IDENT)
        with pytest.raises(StoreError, match=r"dataset_fingerprint: store has d, this sweep other"):
            rs.bind({**IDENT, "dataset_fingerprint": "other"})
        with pytest.raises(StoreError, match=r"model: store has m.*calibration"):
            rs.bind({**IDENT, "model": "m2", "calibration": "taylor:1"})
        rs.bind(IDENT)  # the same experiment is welcome


def test_store_schema_and_garbage(tmp_path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a dynavit result store"):
        ResultStore(tmp_path / "junk.db")
    with ResultStore(tmp_path / "r.db") as rs:
        rs.conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        rs.conn.commit()
    with pytest.raises(StoreError, match="schema version 99"):
        ResultStore(tmp_path / "r.db")
    with pytest.raises(StoreError, match="no result store"):
        ResultStore(tmp_path / "none.db", readonly=True)


def test_full_disk_is_a_clear_error_and_the_store_stays_intact(tmp_path) -> None:
    hits = np.ones((4000, 2), np.uint8)
    with ResultStore(tmp_path / "r.db") as rs:
        rs.bind(IDENT)
        rs.add(make_row(ExecConfig(), hits, 1e9))
        pages = rs.conn.execute("PRAGMA page_count").fetchone()[0]
        rs.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite now answers SQLITE_FULL
        with pytest.raises(StoreError, match="disk is full"):
            rs.add(make_row(ExecConfig(mlp_width=0.5), np.zeros((4000, 2), np.uint8), 5e8))
    with ResultStore(tmp_path / "r.db", readonly=True) as rs:
        assert [r.config for r in rs.rows()] == [ExecConfig()]
        assert rs.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_store_in_a_missing_folder(tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ResultStore(tmp_path / "no" / "such" / "r.db")


# ---------------------------------------------------------------------------------------- pareto


def test_pareto_front_and_plausible_set() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random((300, 2)) < 0.8).astype(np.uint8)
    worse = base.copy()
    worse[:60, 0] = 0  # clearly worse: 60 hits lost
    slightly = base.copy()
    slightly[np.flatnonzero(base[:, 0])[:2], 0] = 0  # 2 hits lost: not significant
    rows = [make_row(ExecConfig(), base, 10.0), make_row(ExecConfig(mlp_width=0.9), slightly, 9.0),
            make_row(ExecConfig(mlp_width=0.5), worse, 9.5), make_row(ExecConfig(mlp_width=0.3), worse, 5.0)]
    f = pareto(rows, "macs", n_boot=500)
    menu = [r.config for r in f.menu()]
    assert menu == [ExecConfig(mlp_width=0.3), ExecConfig(mlp_width=0.9), ExecConfig()]
    plausible = {f.rows[i].config for i in f.plausible}
    assert ExecConfig(mlp_width=0.5) not in plausible  # 0.9 is cheaper and significantly better
    assert ExecConfig() in plausible
    assert best_within(rows, "macs", 9.2).config == ExecConfig(mlp_width=0.9)
    assert best_within(rows, "macs", 1.0) is None


def test_paired_delta_is_tighter_than_marginal() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random((400, 2)) < 0.75).astype(np.uint8)
    b = a.copy()
    b[np.flatnonzero(a[:, 0])[:8], 0] = 0  # 8 of 400 images flip to wrong
    d, lo, hi = stats.paired_delta(b, a, "classification", 1000, 0)
    assert d == pytest.approx(-0.02)
    assert hi < 0  # significant although the marginal CIs (about +-4 pts) overlap
    seg = rng.integers(0, 50, size=(30, 3, 4))
    seg[:, 1] += seg[:, 0]
    seg[:, 2] += seg[:, 0]
    d, lo, hi = stats.paired_delta(seg, seg, "segmentation", 200, 0)
    assert d == 0 and lo == 0 and hi == 0


# ---------------------------------------------------------------------------------------- evaluator


@pytest.fixture(scope="module")
def target(assets):
    from dynavit.sweep.run import SweepTarget

    return SweepTarget(model=str(assets / "models" / "deit-tiny-patch16-224"),
                       data=str(assets / "imagenet-samples"), limit=24, batch_size=8, n_boot=200,
                       latency_repeats=2)


@pytest.fixture(scope="module")
def built(target):
    return target.build()


def test_prefix_reuse_is_exact_and_saves_work(built) -> None:
    from dynavit.sweep.engine import Evaluator

    dm, data, ev, _ = built
    cfgs = [ExecConfig(skip_mlp=(10,)), ExecConfig(skip_mlp=(11,)), ExecConfig(mlp_width=0.5),
            ExecConfig(token_keep=0.8, skip_mlp=(11,))]
    plain = Evaluator(dm, data, reuse_prefix=False, measure_latency=False, n_boot=50)
    fast = Evaluator(dm, data, reuse_prefix=True, measure_latency=False, n_boot=50)
    slow_rows = [plain.measure(c) for c in cfgs]
    fast_rows = [fast.measure(c, next_config=n) for c, n in zip(cfgs, [*cfgs[1:], None], strict=True)]
    for s, f in zip(slow_rows, fast_rows, strict=True):
        assert np.array_equal(s.per_image, f.per_image) and s.macs == f.macs
    # config 2 reused blocks 0..9 of config 1; config 4 reused the 3 blocks before the first token layer
    assert fast.reused_blocks == (10 + 0 + 0) * len(data.batches) and plain.reused_blocks == 0


def test_rescue_ladders_reuse_shared_blocks_exactly(built) -> None:
    """``measure_rescue`` tells ``path_quality`` the next rung: same ladders, fewer blocks computed."""
    from dynavit.runtime import Controller, Entry
    from dynavit.runtime.simulate import path_quality

    dm, data, _, _ = built
    n = len(dm.module.blocks)
    shares = (1 / (n + 2),) * (n + 2)
    menu = [Entry(ExecConfig(), 0.8, latency_p95_ms=8.0, label="full", shares=shares),
            Entry(ExecConfig(mlp_width=0.5), 0.7, latency_p95_ms=6.0, label="half", shares=shares)]
    order = list(reversed(range(n)))  # the last blocks first: the rungs share most of the path
    hinted, plain = path_quality(dm, data), path_quality(dm, data)
    fast = Controller(menu, model=dm, drop_order=order).measure_rescue(hinted)
    slow = Controller(menu, model=dm, drop_order=order).measure_rescue(lambda cfg: plain(cfg))
    assert [len(e.ladder) for e in fast.entries] == [3, 3]
    assert [e.ladder for e in fast.entries] == [e.ladder for e in slow.entries]
    # full: rungs 2 and 3 reuse blocks 0..9 and 0..8 of the rung before; half: the same; none across paths
    assert hinted.evaluator.reused_blocks == 2 * (10 + 9) * len(data.batches)
    assert plain.evaluator.reused_blocks == 0


def test_evaluator_row_is_complete(built) -> None:
    dm, data, ev, _ = built
    r = ev.measure(ExecConfig(token_threshold=0.9))
    assert 0 <= r.quality_lo <= r.quality <= r.quality_hi <= 1
    assert r.per_image.shape == (24, 2)
    assert r.macs == pytest.approx(sum(r.macs_by_class.values())) and r.macs < 1.25e9
    assert set(r.macs_by_class) >= {"linear", "attention", "conv"}
    assert r.latency_p50_ms > 0 and r.latency_p95_ms >= r.latency_p50_ms and r.images_per_s > 0
    assert r.energy_mj is None  # no GPU energy counter on a CPU
    assert r.device.startswith("cpu:") and r.versions["torch"]


def test_sweep_resumes_from_the_store(target, tmp_path) -> None:
    from dynavit.sweep.run import run_sweep

    store = tmp_path / "r.db"
    first = run_sweep(target, space="small", strategy="random", budget=4, store=store, progress=False)
    assert first.measured == 4 and first.total == 4
    again = run_sweep(target, space="small", strategy="random", budget=6, store=store, progress=False)
    assert again.reused == 4 and again.measured == 2 and again.total == 6
    rows = {r.key: r for r in again.rows}
    default = next(r for r in again.rows if r.config.is_default)
    assert default.delta == 0
    for r in rows.values():
        assert r.delta == pytest.approx(r.quality - default.quality)
        assert r.delta_lo <= r.delta <= r.delta_hi
    with ResultStore(store, readonly=True) as rs:
        assert [s for (s,) in rs.conn.execute("SELECT status FROM runs")] == ["done", "done"]
        assert ExecConfig() in rs.profiles()


def test_sweep_refuses_a_store_of_another_dataset(target, tmp_path) -> None:
    from dataclasses import replace

    from dynavit.sweep.run import run_sweep

    store = tmp_path / "r.db"
    run_sweep(target, space="small", strategy="random", budget=2, store=store, progress=False)
    with pytest.raises(StoreError, match="dataset_fingerprint"):
        run_sweep(replace(target, limit=16), space="small", strategy="random", budget=2, store=store,
                  progress=False)
    with ResultStore(store, readonly=True) as rs:
        assert len(rs) == 2


def test_sqlite_wal_mode(tmp_path) -> None:
    ResultStore(tmp_path / "r.db").close()
    assert sqlite3.connect(tmp_path / "r.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_segmentation_sweep_with_decoder_knobs(assets, segformer_camvid, tmp_path) -> None:
    from dynavit.sweep.run import SweepTarget, run_sweep

    target = SweepTarget(model=str(segformer_camvid), data=str(assets / "camvid" / "val"), limit=6, batch_size=3,
                         n_boot=100, latency_repeats=2)
    space = {"decoder_width": [1.0, 0.5], "decoder_branches": [None, [0, 1, 2]]}
    s = run_sweep(target, space=space, strategy="grid", store=tmp_path / "seg.db", progress=False)
    assert s.measured == 4
    rows = {r.config: r for r in s.rows}
    full = rows[ExecConfig()]
    half = rows[ExecConfig(decoder_width=0.5)]
    both = rows[ExecConfig(decoder_width=0.5, decoder_branches=(0, 1, 2))]
    assert full.per_image.shape == (6, 3, 11) and "miou" in full.metrics
    assert full.quality == pytest.approx(stats.point(full.per_image, "segmentation"))
    assert both.macs < half.macs < full.macs
    assert 0 <= both.quality <= 1 and both.delta == pytest.approx(both.quality - full.quality)
    with ResultStore(tmp_path / "seg.db", readonly=True) as rs:
        assert rs.meta["metric"] == "miou" and rs.meta["task"] == "segmentation"


def test_cached_frames_follow_the_batches(built) -> None:
    _, data, _, _ = built
    frames = data.frames()
    assert len(frames) == data.n and frames[0][0].shape == (1, *data.batches[0].shape[1:])
    assert [t for _, t in frames] == [int(t) for tg in data.targets for t in tg]
    assert torch.equal(frames[9][0][0], data.batches[1][1])


def test_measure_configs_times_new_configs_round_robin_like_a_sweep(target, tmp_path) -> None:
    """Configs added to a store later (e.g. rounded by the accelerator DSE) get the sweep's timing protocol."""
    import dataclasses

    from dynavit.sweep import ResultStore, run_sweep
    from dynavit.sweep.run import measure_configs

    store = tmp_path / "s.db"
    run_sweep(dataclasses.replace(target, limit=8), space={"mlp_width": [1.0, 0.75]}, strategy="grid", store=store,
              progress=False)
    new = [ExecConfig(mlp_width=0.5), ExecConfig(heads=2)]
    assert measure_configs(store, new, ["narrow", "two heads"], progress=False) == 2
    assert measure_configs(store, new, progress=False) == 0  # already there
    with ResultStore(store, readonly=True) as rs:
        rows = {r.config: r for r in rs.rows()}
    for c in new:
        lat = rows[c].metrics["latency"]
        assert lat["round"] == 2 and lat["default_drift"] > 0 and rows[c].latency_p95_ms > 0
