"""Exact intervals, the task read off the rows, choosing on one half and scoring on the other, drift flags."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from helpers import Shapes, make_row, tiny_vit

from dynavit.config import ExecConfig
from dynavit.sweep import pareto, stats
from dynavit.sweep.engine import Evaluator, cache_dataset
from dynavit.sweep.pareto import confirmed_best, latency_warnings


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (3, 400, 0.00155, 0.0218),  # 3 misses in 400 frames: "<= 1 %" is not shown
    (5, 5, 0.025 ** 0.2, 1.0),  # 0.478; a bootstrap says [1, 1]
    (0, 10, 0.0, 0.3085),
    (1, 4, 0.00631, 0.8059),
    (20, 2000, 0.00612, 0.01540),
])
def test_clopper_pearson_matches_known_values(k, n, lo, hi) -> None:
    a, b = stats.clopper_pearson(k, n)
    assert a == pytest.approx(lo, abs=5e-5) and b == pytest.approx(hi, abs=5e-5)


def test_clopper_pearson_is_symmetric_and_rejects_nonsense() -> None:
    lo, hi = stats.clopper_pearson(7, 50)
    lo2, hi2 = stats.clopper_pearson(43, 50)
    assert lo == pytest.approx(1 - hi2, abs=1e-9) and hi == pytest.approx(1 - lo2, abs=1e-9)
    with pytest.raises(ValueError):
        stats.clopper_pearson(3, 2)


def _seg_rows(n: int = 40, classes: int = 33) -> list:
    rng = np.random.default_rng(0)
    rows = []
    for j, macs in enumerate((3.0, 2.0, 1.0)):
        gt = rng.integers(50, 100, (n, classes))
        inter = (gt * (0.9 - 0.2 * j) * rng.random((n, classes))).astype(np.int64)
        pred = gt + rng.integers(0, 20, (n, classes))
        per = np.stack([inter, gt, pred], axis=1)  # (n, 3, C): the segmentation layout
        rows.append(make_row(ExecConfig(mlp_width=1 - 0.2 * j), per[:, :, :], macs,
                             quality=stats.point(per, "segmentation")))
    return rows


def test_pareto_takes_the_task_from_the_rows(monkeypatch) -> None:
    rows = _seg_rows()
    assert stats.task_of([r.per_image for r in rows]) == "segmentation"
    seen = []
    real = stats.replicates_many

    def spy(per_images, task, n_boot=1000, seed=0):
        out = real(per_images, task, n_boot, seed)
        seen.append((task, out.shape))
        return out

    monkeypatch.setattr(stats, "replicates_many", spy)
    f = pareto(rows, "macs", n_boot=200)  # no task given
    assert seen == [("segmentation", (3, 200))]  # one replicate row per config, not one per class
    assert f.plausible == pareto(rows, "macs", task="segmentation", n_boot=200).plausible
    with pytest.raises(ValueError, match="segmentation"):
        pareto(rows, "macs", task="classification", n_boot=200)


def test_best_config_is_chosen_on_one_half_and_scored_on_the_other() -> None:
    rng = np.random.default_rng(0)
    n = 400
    rows = [make_row(ExecConfig(mlp_width=0.5, token_keep=1 - i / 200), (rng.random((n, 2)) < 0.7).astype(np.uint8),
                     1.0) for i in range(64)]  # 64 configs, all truly 70 %
    pick, score = stats.split_images(n, 0)
    assert len(set(pick) & set(score)) == 0 and len(pick) + len(score) == n
    lucky = np.zeros((n, 2), np.uint8)
    lucky[pick] = 1  # perfect where it is chosen, useless elsewhere
    rows.append(make_row(ExecConfig(mlp_width=0.25), lucky, 1.0))
    base = make_row(ExecConfig(), (rng.random((n, 2)) < 0.7).astype(np.uint8), 2.0)
    c = confirmed_best([*rows, base], lambda r: r.macs <= 1.0, reference=base)
    assert c.row.config == ExecConfig(mlp_width=0.25) and c.selected_quality == 1.0
    assert c.quality == 0.0 and c.n_select + c.n_confirm == n  # scored where the luck is gone
    assert c.quality_lo == 0.0 and c.quality_hi < 0.02  # exact interval of 0 / 200
    assert c.delta < -0.5 and c.delta_hi < 0
    # the best of many equal configs wins its own half by luck, and only there
    honest = []
    for s in range(10):  # fresh draws each time: 64 configs, all truly 70 %
        equal = [make_row(ExecConfig(token_keep=1 - i / 200), (rng.random((n, 2)) < 0.7).astype(np.uint8), 1.0)
                 for i in range(64)]
        honest.append(confirmed_best(equal, lambda r: True, seed=s))
    for h in honest:
        assert h.quality == h.row.per_image[h.confirm_idx, 0].mean()
    assert np.mean([h.selected_quality for h in honest]) > 0.76  # about 2.4 standard errors above the truth
    assert abs(np.mean([h.quality for h in honest]) - 0.7) < 0.035  # unbiased there (3.5 standard errors)
    assert confirmed_best(rows, lambda r: False) is None


def test_latency_warnings_name_drifted_configs() -> None:
    hits = np.ones((10, 2), np.uint8)
    calm = make_row(ExecConfig(), hits, 2.0, metrics={"latency": {"spread": 1.1, "default_drift": 1.05}})
    drifted = make_row(ExecConfig(mlp_width=0.5), hits, 1.0, label="half",
                       metrics={"latency": {"spread": 2.3, "default_drift": 1.05}})
    assert latency_warnings([calm]) == []
    w = latency_warnings([calm, drifted])
    assert len(w) == 1 and "half" in w[0] and "2.30x" in w[0]
    moved = make_row(ExecConfig(mlp_width=0.7), hits, 1.5, metrics={"latency": {"spread": 1.0, "default_drift": 0.5}})
    assert any("default path" in x for x in latency_warnings([calm, moved]))
    assert pareto([calm, drifted], "macs", n_boot=50).warnings == w


def test_round_robin_timing_flags_a_config_that_slows_down(monkeypatch) -> None:
    dm = tiny_vit()
    data = cache_dataset(dm, Shapes(16), batch_size=8, progress=False, workers=1)
    ev = Evaluator(dm, data, latency_repeats=20, n_boot=0)
    slow, other = ExecConfig(mlp_width=0.5), ExecConfig(skip_blocks=(1,))
    calls = {"n": 0, "timing": False}
    forward, timing = dm.module.forward, ev._round_latency

    def timed(cfgs):  # count from where the timing starts (quality, MACs and throughput run forward too)
        calls["timing"] = True
        return timing(cfgs)

    def slowed(*a, **k):
        if calls["timing"]:
            # every timed run takes at least 20 ms, so a shared machine's jitter on a sub-millisecond
            # forward (a few ms under a full load) cannot reach the 1.5x spread on its own
            time.sleep(0.02)
            if dm.exec_config == slow:
                calls["n"] += 1
                if calls["n"] > 12:  # after the warm-up and half of its timed runs: the machine got slower for it
                    time.sleep(0.06)
        return forward(*a, **k)

    monkeypatch.setattr(dm.module, "forward", slowed)
    monkeypatch.setattr(ev, "_round_latency", timed)
    rows = list(ev.measure_round([ExecConfig(), slow, other], ["default", "slow", "other"]))
    assert [r.label for r in rows] == ["default", "slow", "other"]
    assert all(r.metrics["latency"]["runs"] == 20 and r.latency_p50_ms for r in rows)
    w = latency_warnings(rows)
    assert len(w) == 1 and w[0].startswith("slow:")


def test_calibrating_on_the_measured_images_warns() -> None:
    dm = tiny_vit()
    shapes = Shapes(16)
    dm.calibrate([shapes.load(i)[0] for i in range(6)])
    data = cache_dataset(dm, shapes, batch_size=8, progress=False, workers=1)
    with pytest.warns(UserWarning, match="6 of the 16 images"):
        Evaluator(dm, data, n_boot=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Evaluator(dm, data.subset(np.arange(6, 16)), n_boot=0)  # the other images: silent


def test_report_warns_when_the_stored_default_latency_and_its_profile_disagree(tmp_path) -> None:
    from dynavit.report.data import ReportData

    base = make_row(ExecConfig(), np.ones((10, 2), np.uint8), 2.0, latency_p50_ms=1767.0)

    def data(profile_ms: float) -> ReportData:
        return ReportData(tmp_path, {}, {}, [base], base, {}, [], {"latency_ms": profile_ms}, 100, 0)

    w = data(105.0).warnings  # the loaded-machine store next to a calm profile
    assert len(w) == 1 and "16.8x" in w[0]
    assert data(1500.0).warnings == []
