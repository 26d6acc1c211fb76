"""The budget controller: selection, reported misses, online correction, and trace simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_row

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.runtime import Controller, Entry
from dynavit.runtime.simulate import CompetingLoad, PolicyStats, SimResult, hindsight_bounds, simulate
from dynavit.runtime.traces import load_trace, make_trace
from dynavit.sweep.store import ResultStore

FULL, MID, SMALL = ExecConfig(), ExecConfig(mlp_width=0.5), ExecConfig(resolution=160)
MENU = [Entry(SMALL, 0.70, latency_p95_ms=2.0, gmacs=0.5, batch=8, batch_p95_ms=10.0, label="small"),
        Entry(MID, 0.75, latency_p95_ms=4.0, gmacs=0.8, batch=8, batch_p95_ms=20.0, label="mid"),
        Entry(FULL, 0.80, latency_p95_ms=8.0, gmacs=1.25, batch=8, batch_p95_ms=40.0, label="full")]


def test_select_the_most_accurate_that_fits() -> None:
    c = Controller(MENU, margin=0.0)
    assert c.select(latency_ms=10).config == FULL
    assert c.select(latency_ms=7.9).config == MID
    assert c.select(gmacs=0.6).config == SMALL
    ch = c.select(latency_ms=1.0)
    assert ch.config == SMALL and ch.budget_met is False and ch.predicted == 2.0  # reported, not silent
    assert Controller(MENU, margin=0.1).select(latency_ms=8.5).config == MID  # 8 * 1.1 > 8.5


def test_batch_prediction_interpolates_between_measured_batches() -> None:
    c = Controller(MENU, margin=0.0)
    assert c.predict(MENU[2], batch=8) == 40.0
    assert c.predict(MENU[2], batch=1) == 8.0
    assert c.predict(MENU[2], batch=4) == pytest.approx(8 + 32 * 3 / 7)
    assert c.select(latency_ms=25, batch=8).config == MID


@pytest.mark.parametrize("budget, match", [
    ({"latency_ms": -1}, "positive"), ({"latency_ms": float("nan")}, "positive"), ({"latency_ms": 0}, "positive"),
    ({}, "exactly one"), ({"latency_ms": 1, "gmacs": 1}, "exactly one"), ({"latency_ms": "fast"}, "a number"),
    ({"energy_mj": 5}, "energy"),
])
def test_bad_budgets(budget, match) -> None:
    with pytest.raises(DynavitError, match=match):
        Controller(MENU).select(**budget)


def test_online_correction_moves_down_under_slowdown_and_back_after() -> None:
    c = Controller(MENU, margin=0.05)
    assert c.select(latency_ms=9).config == FULL
    for i in range(200):  # a steady machine, +-2 % jitter
        c.observe(FULL, 8.0 * (1.02 if i % 2 else 0.98))
    assert c.select(latency_ms=9).config == FULL
    for _ in range(10):  # the machine is 1.6x slower
        ch = c.select(latency_ms=9)
        c.observe(ch.config, 1.6 * {FULL: 8.0, MID: 4.0, SMALL: 2.0}[ch.config])
    assert c.slowdown == pytest.approx(1.6, rel=0.05)
    assert c.select(latency_ms=9).config == MID  # 8 * 1.6 no longer fits; 4 * 1.6 does
    for _ in range(15):  # load gone
        ch = c.select(latency_ms=9)
        c.observe(ch.config, {FULL: 8.0, MID: 4.0, SMALL: 2.0}[ch.config])
    assert c.select(latency_ms=9).config == FULL
    frozen = Controller(MENU, correct=False)
    frozen.observe(FULL, 100.0)
    assert frozen.select(latency_ms=9).config == FULL and frozen.slowdown == 1.0


def test_the_99th_percentile_tail_waits_for_100_observations() -> None:
    """A 99th percentile of 8 runs is their maximum: by default the margin rules until 100 are in."""
    c = Controller(MENU, margin=0.5)
    for _ in range(99):
        c.observe(FULL, 8.0)
    assert c.select(latency_ms=8.5).config == MID  # still the margin: 8 * 1.5 > 8.5
    c.observe(FULL, 8.0)
    assert c.select(latency_ms=8.5).config == FULL  # 100 runs exactly as predicted: the tail is 1


def test_margin_guards_only_until_the_tail_is_measured() -> None:
    c = Controller(MENU, margin=0.5, min_obs=2)
    assert c.select(latency_ms=8.5).config == MID  # 8 * 1.5 > 8.5: no tail measured yet, the margin applies
    for _ in range(2):
        c.observe(FULL, 8.0)  # runs exactly as predicted: level 1, tail 1
    assert c.tail == pytest.approx(1.0) and c.select(latency_ms=8.5).config == FULL  # the tail is the margin
    assert Controller(MENU, margin=0.5, min_obs=2, correct=False).select(latency_ms=8.5).config == MID


def test_from_store_uses_the_front_and_refuses_other_weights(tmp_path) -> None:
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config
    from dynavit.sweep.measured import model_fingerprint

    dm = from_config(preset_config("vit-t16"), seed=0, source="m")
    hits = np.ones((10, 2), np.uint8)
    worse = hits.copy()
    worse[:3, 0] = 0
    with ResultStore(tmp_path / "r.db") as rs:
        rs.bind({"model": "m", "model_fingerprint": model_fingerprint(dm), "calibration": "none",
                 "dataset_fingerprint": "d", "task": "classification", "metric": "top1", "protocol": {}})
        rs.add(make_row(FULL, hits, 1.25e9, latency_p50_ms=7.0, latency_p95_ms=8.0))
        rs.add(make_row(MID, worse, 0.8e9, latency_p50_ms=3.0, latency_p95_ms=4.0))
        rs.add(make_row(SMALL, worse, 0.5e9, latency_p50_ms=5.0, latency_p95_ms=9.0))  # dominated in latency
    c = Controller.from_store(tmp_path / "r.db")
    assert [e.config for e in c.entries] == [MID, FULL]
    assert [(e.latency_p50_ms, e.latency_p95_ms, e.quality_lo) for e in c.entries] == [
        (3.0, 4.0, pytest.approx(0.65)), (7.0, 8.0, pytest.approx(0.95))]  # the store's numbers, by the store's names
    same_name = from_config(preset_config("vit-t16"), seed=1, source="m")  # the name is not what is checked
    with pytest.raises(DynavitError, match=r"was measured on m \(weights .*not on m \(weights"):
        Controller.from_store(tmp_path / "r.db", model=same_name)
    with pytest.raises(DynavitError, match="no model"):
        c.run(None, latency_ms=5)
    with pytest.raises(DynavitError, match="records no sweep run"):  # nothing to load the model from
        Controller.from_store(tmp_path / "r.db", model=None, probe=dm.example_input())

    profiled = Controller.from_store(tmp_path / "r.db", model=dm, probe=dm.example_input(), runs=4)
    assert profiled.model is dm and FULL in {e.config for e in profiled.entries}
    assert all(e.latency_p95_ms not in (4.0, 8.0, 9.0) for e in profiled.entries)  # measured here, not stored
    with pytest.raises(DynavitError, match="re-measures latency"):
        Controller.from_store(tmp_path / "r.db", model=dm, cost="macs", probe=dm.example_input())


def test_run_and_budget_context_on_a_real_forward() -> None:
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    dm = from_config(preset_config("vit-t16"), seed=0)
    c = Controller(MENU, model=dm, margin=0.0)
    x = dm.example_input()
    out = c.run(x, latency_ms=5)
    assert out.choice.config == MID and out.output.shape == (1, dm.num_labels)
    assert out.measured_ms > 0 and out.deadline_met == (out.measured_ms <= 5)
    assert c.history[-1][0] == MID and c.history[-1][2] == out.measured_ms
    dm.configure(FULL)
    with c.budget(gmacs=0.6) as choice:
        assert dm.exec_config == SMALL == choice.config
        dm(x)
    assert dm.exec_config == FULL  # restored
    assert len(c.history) == 2


def test_profile_remeasures_the_menu_and_keeps_the_measured_front() -> None:
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    dm = from_config(preset_config("vit-t16"), seed=0)
    # stored latencies from "another machine", upside down: the full model claims to be the cheapest
    wrong = [Entry(SMALL, 0.70, latency_p95_ms=90.0, latency_p50_ms=80.0, label="small"),
             Entry(MID, 0.75, latency_p95_ms=50.0, latency_p50_ms=45.0, label="mid"),
             Entry(FULL, 0.80, latency_p95_ms=1.0, latency_p50_ms=0.9, label="full")]
    assert [e.config for e in Controller(wrong).entries] == [SMALL, MID, FULL]
    every = Controller(wrong, model=dm).profile(dm.example_input(), runs=5, front=False)
    assert [e.config for e in every.entries] == [SMALL, MID, FULL]
    assert all(e.latency_p95_ms not in (90.0, 50.0, 1.0) and 0 < e.latency_p50_ms <= e.latency_p95_ms
               for e in every.entries)  # measured here, not the stored numbers
    c = Controller(wrong, model=dm, min_obs=8).profile(dm.example_input(), runs=9)
    by = {e.config: e for e in c.entries}
    assert FULL in by  # the most accurate path is on every front
    order = sorted(c.entries, key=lambda e: e.latency_p95_ms)
    assert [e.quality for e in order] == sorted(e.quality for e in order)  # a front: dearer is better
    assert len(c._c.jitter) >= 8 and c.tail >= 1.0  # the tail is known before the first frame
    assert c.predict(by[FULL]) == pytest.approx(by[FULL].latency_p50_ms * c.tail)  # level 1: p50 x measured tail
    roomy = by[FULL].latency_p50_ms * max(c._c.jitter) * 1.01  # above every profiled run: no risk
    assert c.miss_risk(by[FULL], roomy) == 0.0 and c.select(latency_ms=roomy).config == FULL
    assert dm.exec_config == ExecConfig()  # restored
    with pytest.raises(DynavitError, match="input images of shape"):
        c.profile(torch.zeros(3, 224, 224))


def test_profile_times_each_path_on_every_image_it_is_given() -> None:
    """A path's time can depend on the image (per-image token counts): each round runs the next image."""
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    dm = from_config(preset_config("vit-t16"), seed=0)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    sums = [float(x.sum()) for x in images]
    seen: list[float] = []
    conv = next(m for m in dm.module.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_pre_hook(lambda _m, args: seen.append(float(args[0].sum())))
    try:
        c = Controller([Entry(MID, 0.7, latency_p95_ms=2.0), Entry(FULL, 0.8, latency_p95_ms=4.0)],
                       model=dm).profile(images, runs=6, warmup=1, front=False)
    finally:
        hook.remove()
    assert len(c._c.jitter) == 12
    timed = seen[2:2 + 12]  # after one warm-up run per path: 6 rounds of both paths
    assert [round(v, 2) for v in timed] == [round(sums[r % 3], 2) for r in range(6) for _ in range(2)]


def test_traces() -> None:
    for kind in ("step", "sine", "random-walk", "bursty"):
        t = make_trace(kind, 200, 5.0, 20.0, seed=1)
        assert len(t) == 200 and t.min() >= 5.0 - 1e-9 and t.max() <= 20.0 + 1e-9
    assert np.array_equal(make_trace("random-walk", 50, 1, 4, 3), make_trace("random-walk", 50, 1, 4, 3))
    step = make_trace("step", 8, 1.0, 4.0)
    assert step.tolist() == [4, 4, 1, 1, 4, 4, 1, 1]
    with pytest.raises(DynavitError, match="unknown trace"):
        make_trace("square", 10, 1, 2)


def test_trace_file(tmp_path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("# budgets\n5\n6.5, frame 2\n\n7\n")
    assert load_trace(f).tolist() == [5, 6.5, 7]
    f.write_text("5\n-1\n")
    with pytest.raises(DynavitError, match="t.txt:2"):
        load_trace(f)
    f.write_text("fast\n")
    with pytest.raises(DynavitError, match="not a latency budget"):
        load_trace(f)


def test_simulate_runs_every_policy_on_every_frame() -> None:
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    dm = from_config(preset_config("vit-t16"), seed=0)
    g = torch.Generator().manual_seed(0)
    frames = [(torch.randn(1, 3, 224, 224, generator=g), i) for i in range(3)]
    ctrl = Controller(MENU, model=dm)
    res = simulate(dm, ctrl, frames, make_trace("step", 8, 3.0, 12.0), progress=False, warmup=1)
    for name, p in res.policies.items():
        assert len(p.met) == 8, name
        assert p.met == [ms <= b for ms, b in zip(p.latency_ms, res.budgets, strict=True)]
    assert set(res.policies["smallest"].configs) == {"small"}
    assert set(res.policies["default"].configs) == {"full"}
    assert len(res.slowdown) == 8 and res.table()[0]["policy"] == "controller"


def test_simulate_interleaves_policies_frame_by_frame() -> None:
    """Side by side: every frame, each policy (``others`` included) takes one turn, in a shuffled order."""
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    dm = from_config(preset_config("vit-t16"), seed=0)
    frames = [(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)), 0)]
    calls: list[str] = []

    def recording(name: str, ctrl: Controller) -> Controller:
        ctrl.run = lambda x, **b: (calls.append(name), Controller.run(ctrl, x, **b))[1]
        return ctrl

    budgets = make_trace("step", 8, 3.0, 12.0)
    for interleave in (True, False):
        calls.clear()
        ctrl, twin = recording("controller", Controller(MENU, model=dm)), recording("twin", Controller(MENU, model=dm))
        res = simulate(dm, ctrl, frames, budgets, policies=("controller",), others={"twin": twin},
                       interleave=interleave, progress=False, warmup=1)
        assert list(res.policies) == ["controller", "twin"] and len(res.policies["twin"].met) == 8
        if interleave:
            turns = [tuple(calls[k:k + 2]) for k in range(0, 16, 2)]
            assert all(set(t) == {"controller", "twin"} for t in turns)
            assert len(set(turns)) == 2  # both orders occur: no policy always runs first
        else:
            assert calls == ["controller"] * 8 + ["twin"] * 8
    with pytest.raises(DynavitError, match="reuse policy names"):
        simulate(dm, ctrl, frames, budgets, others={"oracle": twin}, progress=False)


def test_competing_load_is_stopped() -> None:
    with CompetingLoad() as load:
        assert load.proc.poll() is None
    assert load.proc.poll() is not None


def test_prediction_covers_the_jitter_tail() -> None:
    """Prediction = p50 x level (recent runs) x tail (99th percentile of one-step errors)."""
    menu = [Entry(MID, 0.75, latency_p95_ms=4.4, latency_p50_ms=4.0),
            Entry(FULL, 0.8, latency_p95_ms=8.8, latency_p50_ms=8.0)]
    c = Controller(menu, margin=0.0, target_miss=0.01, min_obs=8)
    assert c.predict(menu[1]) == pytest.approx(8.8)  # too few observations: the sweep's p95
    rng = np.random.default_rng(0)
    jitter = np.r_[np.where(rng.random(400) < 0.05, 1.5, 1.0), np.ones(6)]  # 5 % of runs take 1.5x
    for j in jitter:
        c.observe(FULL, 8.0 * j)
    assert c.slowdown == pytest.approx(1.0, rel=0.02)
    assert c.tail == pytest.approx(1.5, rel=0.05)  # the one-step errors: a spike is not foreseen
    assert c.predict(menu[1]) == pytest.approx(12.0, rel=0.05)
    assert c.miss_risk(menu[1], 10.0) == pytest.approx(0.05, abs=0.02)  # 8 x 1.5 > 10 in 5 % of runs
    assert c.miss_risk(menu[0], 10.0) == 0.0
    assert c.miss_risk(menu[1], 12.5) == 0.0
    c.observe(FULL, 12.0)  # a spike moves the level by its level_alpha-th power ...
    assert c.slowdown == pytest.approx(1.5 ** c.options.level_alpha, rel=0.03)
    for _ in range(5):  # ... and is forgotten within a few runs
        c.observe(FULL, 8.0)
    assert c.slowdown == pytest.approx(1.0, rel=0.03)
    for _ in range(9):  # a sustained 2x slowdown moves the level within a few runs
        c.observe(MID, 8.0)
    assert c.slowdown == pytest.approx(2.0, rel=0.05)


def test_level_follows_a_persistent_slowdown_that_a_median_would_lag() -> None:
    """Slowdowns persist from run to run: after the first slow runs the prediction is already up."""
    c = Controller([Entry(FULL, 0.8, latency_p95_ms=8.8, latency_p50_ms=8.0)], min_obs=1)
    c.observe(FULL, 8.0)
    for _ in range(2):
        c.observe(FULL, 12.0)
    assert c.slowdown > 1.3  # a median of the last nine would still read 1.0


def _spiky(c: Controller, config: ExecConfig, p50: float, n: int = 200) -> None:
    """Feed ``n`` runs of which every 20th takes 1.5x (5 % spikes); no budgets, so no misses counted."""
    for i in range(n):
        c.observe(config, p50 * (1.5 if i % 20 == 0 else 1.0))


def test_priced_selection_spends_the_miss_allowance_where_it_pays() -> None:
    menu = [Entry(MID, 0.75, latency_p95_ms=6.6, latency_p50_ms=6.0),
            Entry(FULL, 0.85, latency_p95_ms=8.8, latency_p50_ms=8.0)]
    c = Controller(menu, target_miss=0.01, price0=1.0)  # one expected miss costs 1.0 top-1 (100 pt)
    _spiky(c, FULL, 8.0)
    assert c.predict(menu[1]) == pytest.approx(12.0, rel=0.05)  # the 99th percentile overruns a 10 ms budget...
    ch = c.select(latency_ms=10)
    assert ch.config == FULL and ch.budget_met and ch.miss_risk == pytest.approx(0.05, abs=0.01)  # +10 pt: worth 5 %
    cheap_gain = [Entry(MID, 0.75, latency_p95_ms=6.6, latency_p50_ms=6.0),
                  Entry(FULL, 0.77, latency_p95_ms=8.8, latency_p50_ms=8.0)]
    c2 = Controller(cheap_gain, target_miss=0.01, price0=1.0)
    _spiky(c2, FULL, 8.0)
    assert c2.select(latency_ms=10).config == MID  # +2 pt is not worth a 5 % chance of missing
    for _ in range(5):  # five unforeseen misses raise the price of risk ...
        c.observe(FULL, 12.0, budget_ms=10.0)
        c.observe(FULL, 8.0)
        c.observe(FULL, 8.0)
    assert c.price > 2.0
    assert c.select(latency_ms=10).config == MID  # ... and the next choices are safe
    ch = c.select(latency_ms=1.0)
    assert ch.config == MID and not ch.budget_met and ch.miss_risk == 1.0  # nothing can fit: cheapest, flagged


def test_priced_controller_holds_the_miss_target_on_a_jittery_machine() -> None:
    """Random-walk budgets over 4x, log-normal jitter with 3 % spikes: misses near the target, not far below."""
    p50 = np.geomspace(10, 30, 8)
    quality = 0.5 + 0.3 * np.sqrt((p50 - 10) / 20)
    menu = [Entry(ExecConfig(resolution=224 - 16 * i), float(q), latency_p95_ms=float(m * 1.2), latency_p50_ms=float(m))
            for i, (q, m) in enumerate(zip(quality[::-1], p50[::-1], strict=True))]
    budgets = make_trace("random-walk", 3000, 12.5, 50.0, seed=1)

    def run(**kw: float) -> tuple[float, float]:
        rng = np.random.default_rng(0)
        c = Controller(menu, **kw)
        misses, q = 0, []
        for b in budgets:
            ch = c.select(latency_ms=float(b))
            ms = ch.entry.latency_p50_ms * float(np.exp(rng.normal(0, 0.05))) * (1.4 if rng.random() < 0.03 else 1.0)
            c.observe(ch.config, ms, budget_ms=float(b))
            misses += ms > b
            q.append(ch.entry.quality)
        return misses / len(budgets), float(np.mean(q))

    rate, quality_priced = run()
    assert 0.003 <= rate <= 0.015
    cautious_rate, quality_cautious = run(price0=100.0, price_step=0.0)  # never trades risk for quality
    assert cautious_rate < rate and quality_priced > quality_cautious + 0.005


def test_price_is_bounded_and_ignores_misses_that_nothing_could_avoid() -> None:
    menu = [Entry(MID, 0.75, latency_p95_ms=6.6, latency_p50_ms=6.0),
            Entry(FULL, 0.85, latency_p95_ms=8.8, latency_p50_ms=8.0)]
    c = Controller(menu, miss_debt=10.0, miss_credit=2.0)
    _spiky(c, FULL, 8.0)
    p0 = c.price
    c.observe(MID, 6.0, budget_ms=3.0)  # risk 1 when chosen: a predicted miss does not raise the price
    assert c.price == pytest.approx(p0)
    for _ in range(4):
        c.observe(FULL, 12.0, budget_ms=10.0)  # unforeseen misses (risk ~5 %) do
        c.observe(FULL, 8.0)
        c.observe(FULL, 8.0)
    assert c.price > 2 * p0
    p1 = c.price
    for _ in range(3):  # a sustained slowdown is foreseen after its first run: only that first miss counts
        c.observe(FULL, 16.0, budget_ms=10.0)
    assert c.miss_risk(menu[1], 10.0) > 0.5
    assert c.price == pytest.approx(p1 * np.exp(c.options.price_step * (1 - c.options.target_miss)))
    for _ in range(200):  # a long stretch of them (spikes too rare to move the level): the price stops at its bound
        c.observe(FULL, 12.0, budget_ms=10.0)
        c.observe(FULL, 8.0)
        c.observe(FULL, 8.0)
    assert c.miss_risk(menu[1], 10.0) < 0.5
    assert c.price == pytest.approx(c.options.price0 * np.exp(c.options.price_step * 10.0))
    for _ in range(5000):  # and an easy stretch cannot bank more than miss_credit
        c.observe(MID, 6.0, budget_ms=20.0)
    assert c.price == pytest.approx(c.options.price0 * np.exp(-c.options.price_step * 2.0))


def test_hindsight_bounds_sit_between_a_blind_controller_and_the_oracle() -> None:
    """Knowing each frame's speed is worth something; seeing each run's own jitter (the oracle) more."""
    rng = np.random.default_rng(0)
    menu = [Entry(SMALL, 0.6, latency_p95_ms=11.0, latency_p50_ms=10.0),
            Entry(MID, 0.7, latency_p95_ms=16.5, latency_p50_ms=15.0),
            Entry(FULL, 0.8, latency_p95_ms=22.0, latency_p50_ms=20.0)]
    n = 3000
    speed = np.exp(np.cumsum(rng.normal(0, 0.02, n)).clip(-0.3, 0.3))  # a slowly drifting machine
    ms = np.array([10.0, 15.0, 20.0])[None, :] * speed[:, None] * np.exp(rng.normal(0, 0.04, (n, 3)))
    budgets = rng.uniform(14, 28, n)
    oracle = PolicyStats("oracle", menu_ms=ms.tolist())
    for row, b in zip(ms, budgets, strict=True):
        fit = [i for i in range(3) if row[i] <= b]
        oracle.quality.append(menu[max(fit)].quality if fit else menu[0].quality)
    res = SimResult(budgets, {"oracle": oracle}, None, [])
    bounds = hindsight_bounds(res, menu, target_miss=0.01)
    known, blind = bounds["speed known"], bounds["speed unknown"]
    assert known["miss_rate"] <= 0.01 and blind["miss_rate"] <= 0.01
    assert blind["menu_quality"] + 0.005 < known["menu_quality"] < float(np.mean(oracle.quality))
    assert hindsight_bounds(SimResult(budgets, {}, None, []), menu) == {}
