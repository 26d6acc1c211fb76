"""A deadline inside the forward pass: blocks dropped when a run falls behind, and what the controller learns."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import require

import dynavit.deadline as deadline_mod
from dynavit.config import ExecConfig
from dynavit.deadline import Deadline, stage_shares
from dynavit.errors import DynavitError
from dynavit.runtime import Controller, Entry
from dynavit.runtime.simulate import simulate
from dynavit.runtime.traces import make_trace

FULL, MID, SMALL = ExecConfig(), ExecConfig(mlp_width=0.5), ExecConfig(resolution=160)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def at_ms(self, ms: float) -> None:
        self.t = ms / 1e3


def _plan(n: int, token_at: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(blocks=[SimpleNamespace(attn=True, mlp=True, token_op="prune" if i == token_at else None)
                                   for i in range(n)])


@pytest.fixture
def ticking(monkeypatch) -> None:
    """A fake clock on which each stage of a ViT forward that runs (input, a block, the head) takes 1 ms."""
    import dynavit.runtime.run as run_mod
    from dynavit.models.vit import DynViT

    now = [0.0]
    fake = SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(deadline_mod, "time", fake)
    monkeypatch.setattr(run_mod, "time", fake)
    for name in ("begin", "step", "end"):
        def stage(self, *args, _run=getattr(DynViT, name)):
            now[0] += 1e-3
            return _run(self, *args)
        monkeypatch.setattr(DynViT, name, stage)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(deadline_mod, "time", SimpleNamespace(perf_counter=c))
    return c


def test_a_run_behind_schedule_drops_its_least_important_remaining_blocks(clock) -> None:
    plan = _plan(4)
    d = Deadline(10.0, [0.1, 0.2, 0.2, 0.2, 0.2, 0.1], order=[0, 3, 1, 2], start=0.0, max_drop=2)
    assert d.skip(0, plan) is False  # no pace measured yet: block 0 runs
    clock.at_ms(4.0)  # the input stage and block 0 (0.3 of the path) took 4 ms: the whole would take 13.3
    assert d.skip(1, plan) is True  # 0 already ran; dropping 3 and 1 would fit, and 1 is next
    assert d.dropped == [1]
    clock.at_ms(4.1)
    assert d.skip(2, plan) is False  # dropping 3 alone now fits: 2 runs, 3 is decided at its turn
    clock.at_ms(6.8)
    assert d.skip(3, plan) is True and d.dropped == [1, 3]
    clock.at_ms(7.0)
    d.finish()
    assert d.executed(ExecConfig(mlp_width=0.5)) == ExecConfig(mlp_width=0.5, skip_blocks=(1, 3))
    assert d.full_ms == pytest.approx(7.0 / 0.6)  # the pace over what ran: 0.6 of the path in 7 ms


def test_a_run_on_schedule_or_beyond_rescue_drops_nothing(clock) -> None:
    plan = _plan(4, token_at=3)
    d = Deadline(10.0, [0.1, 0.2, 0.2, 0.2, 0.2, 0.1], order=[3, 2, 1, 0], start=0.0)
    for i, t in enumerate((0.0, 2.0, 4.0, 6.0)):
        clock.at_ms(t)
        assert d.skip(i, plan) is False
    clock.at_ms(9.5)
    d.finish()
    assert d.dropped == [] and d.executed(MID) is MID and d.full_ms == pytest.approx(9.5)
    shares = [0.1, 0.2, 0.2, 0.2, 0.2, 0.1]
    for max_drop, at, dropped in ((4, 4.0, [3]), (0, 4.0, []), (4, 9.0, [])):
        late = Deadline(10.0, shares, order=[3, 2, 1, 0], start=0.0, max_drop=max_drop)
        late.skip(0, plan)
        skipped = []
        for i in (1, 2, 3):  # 2 ms a block from ``at``: at 4 ms, dropping 3 (which reduces tokens, and still will)
            clock.at_ms(at + 2.0 * (i - 1))  # fits once blocks 1 and 2 ran; from 9 ms nothing fits
            skipped += [i] if late.skip(i, plan) else []
        assert skipped == late.dropped == dropped
    assert late.executed(MID) is MID
    assert Deadline(10.0, shares, order=[3, 2, 1, 0], start=0.0, max_drop=4).executed(MID) is MID
    assert Deadline(10.0, shares, order=[0]).max_drop is None  # a quarter of the blocks, once the plan is seen


def test_a_dropped_block_that_reduces_tokens_saves_only_what_it_no_longer_runs(clock) -> None:
    plan = SimpleNamespace(blocks=[SimpleNamespace(attn=True, mlp=True, token_op="merge") for _ in range(4)])
    shares = [0.1, 0.2, 0.2, 0.2, 0.2, 0.1]
    for residual, dropped in ((None, []), ([0.0, 0.1, 0.1, 0.1, 0.1, 0.0], [1])):
        d = Deadline(10.0, shares, order=[3, 2, 1, 0], start=0.0, residual=residual, max_drop=4)
        d.skip(0, plan)
        clock.at_ms(4.0)  # the whole would take 13.3 ms: dropping 3 and 2 fits if each saves 0.2, not if 0.1
        assert [i for i in (1,) if d.skip(i, plan)] == dropped
        assert d.done == pytest.approx(0.3 + (0.1 if dropped else 0.2))  # a dropped block's reduction still ran
    with pytest.raises(DynavitError, match="residual"):
        Deadline(10.0, shares, order=[0], residual=[0.0, 0.1])


def test_bad_deadlines() -> None:
    with pytest.raises(DynavitError, match="positive budget"):
        Deadline(0.0, [0.5, 0.5, 0.5], order=[0])
    with pytest.raises(DynavitError, match="shares"):
        Deadline(1.0, [1.0, -1.0, 1.0], order=[0])
    assert stage_shares([[1, 2, 1], [3, 2, 1]]) == pytest.approx([0.4, 0.4, 0.2])


def _vit():
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    dm = from_config(preset_config("vit-t16"), seed=0)
    return dm, dm.example_input()


def test_vit_forward_under_a_deadline_is_exactly_the_executed_path(ticking) -> None:
    dm, x = _vit()
    dm.calibrate(torch.randn(16, 3, *dm.input_size), batch_size=8)  # compensated: a skipped block adds its means
    with torch.inference_mode():
        _deadline_runs_the_executed_path(dm, x)


def _deadline_runs_the_executed_path(dm, x: torch.Tensor) -> None:
    n = len(dm.module.blocks)
    shares = [1.0] * (n + 2)  # every stage takes 1 ms: the whole path n + 2 ms
    skipping = ExecConfig(mlp_width=0.5, skip_blocks=(1,))
    dm.configure(skipping)
    plain = dm(x)
    dm.module.deadline = Deadline(1e6, shares, order=list(range(n)), start=0.0)  # roomy: nothing dropped
    assert torch.equal(dm(x), plain) and dm.module.deadline.dropped == []  # the skip is compensated as planned
    token_paths = (ExecConfig(token_keep=0.7, token_layers=(3, 6)), ExecConfig(token_method="merge", token_r=4),
                   ExecConfig(token_method="merge", token_threshold=0.2, token_threshold_step=0.01),
                   ExecConfig(token_method="prune+merge", token_keep=0.8, token_layers=tuple(range(n))))
    for cfg in (ExecConfig(mlp_width=0.5), *token_paths):
        dm.configure(cfg)
        plain = dm(x)
        dm.module.deadline = Deadline(1e6, shares, order=list(range(n)), start=0.0)
        assert torch.equal(dm(x), plain) and dm.module.deadline.dropped == []
        order = [n - 1, 6, 5, 4, 3, 2]  # 6 and 3 change the token count in the second config
        d = dm.module.deadline = Deadline(n - 0.3, shares, order=order, start=deadline_mod.time.perf_counter(),
                                          max_drop=3)
        out = dm(x)
        dm.module.deadline = None
        assert sorted(d.dropped) == sorted(order[:3])
        assert d.elapsed_ms == pytest.approx(n - 1)  # made it: three blocks fewer
        ran = d.executed(cfg)
        assert torch.equal(out, dm.configure(ran)(x))
        reducing = {i for i, b in enumerate(dm.module.plan.blocks) if b.token_op}
        # a dropped block that reduces tokens still reduces them: the later blocks see the timed token count
        assert set(ran.skip_keep_tokens) == set(d.dropped) & reducing
        assert set(ran.skip_blocks) == set(d.dropped) - reducing
        assert (ran.skip_keep_tokens != ()) == (cfg in token_paths)


def test_controller_runs_under_a_deadline_and_learns_from_the_pace(ticking) -> None:
    dm, x = _vit()
    n = len(dm.module.blocks)
    menu = [Entry(SMALL, 0.70, latency_p95_ms=2.0, label="small"), Entry(FULL, 0.80, latency_p95_ms=8.0, label="full")]
    c = Controller(menu, model=dm, drop_order=list(reversed(range(1, n))), rescue_max_drop=n, min_obs=4
                   ).profile(x, runs=4, front=False)
    assert all(e.shares is not None and len(e.shares) == n + 2 and sum(e.shares) == pytest.approx(1)
               for e in c.entries)
    assert c.deadline(c.select(latency_ms=1.0)) is None  # no ladder measured: the cost of drops is unknown
    c.measure_rescue(lambda cfg: 0.5)
    full = next(e for e in c.entries if e.config == FULL)
    tight = 0.6 * min(e.latency_p50_ms for e in c.entries)
    out = c.run(x, latency_ms=tight)  # too tight for any whole path; dropping most blocks fits
    assert out.choice.budget_met is True and out.choice.miss_risk == 0.0  # the ladder says drops will save it
    assert len(out.dropped) == 6
    assert out.deadline_met and out.measured_ms <= tight
    assert out.executed == out.choice.config.replace(skip_blocks=tuple(sorted(out.dropped)))
    assert c.history[-1][2] > out.measured_ms  # the speed is learnt from the pace, not the truncated run
    with c.budget(latency_ms=tight) as choice:
        dm(x)
    assert choice.dropped and dm.module.deadline is None
    roomy = c.run(x, latency_ms=full.latency_p50_ms * 50)
    assert roomy.choice.config == FULL and roomy.dropped == () and roomy.executed == FULL
    off = Controller(c.entries, model=dm, drop_order=[1], rescue=False)
    assert off.run(x, latency_ms=0.01).dropped == ()
    uncalibrated = Controller(c.entries, model=dm)  # no drop order and no calibration ranking: no deadline
    assert uncalibrated.deadline(uncalibrated.select(latency_ms=0.01)) is None


def test_simulate_measures_the_quality_of_rescued_frames(ticking) -> None:
    dm, x = _vit()
    n = len(dm.module.blocks)
    menu = [Entry(SMALL, 0.70, latency_p95_ms=2.0, label="small"), Entry(FULL, 0.80, latency_p95_ms=8.0, label="full")]
    c = Controller(menu, model=dm, drop_order=list(reversed(range(1, n))), rescue_max_drop=n
                   ).profile(x, runs=3, front=False).measure_rescue(lambda cfg: 0.1)
    frames = [(x, 0)]
    b = 0.6 * min(e.latency_p50_ms for e in c.entries)
    tight = make_trace("step", 4, b, b)  # no whole path fits: every controller frame rescued
    seen = []

    def quality_of(cfg: ExecConfig) -> float:
        seen.append(cfg)
        return 0.5

    res = simulate(dm, c, frames, tight, policies=("controller", "smallest"), quality_of=quality_of,
                   progress=False, warmup=1)
    ctl = res.policies["controller"]
    assert ctl.summary()["rescued"] == 4 and ctl.quality == [0.5] * 4
    assert all(cfg.skip_blocks for cfg in seen) and res.policies["smallest"].summary()["rescued"] == 0
    blind = simulate(dm, c, frames, tight, policies=("controller",), progress=False, warmup=1)
    assert math.isnan(blind.policies["controller"].summary()["menu_quality"])  # unknown, not guessed


def test_a_rescue_ladder_makes_a_tight_path_worth_choosing() -> None:
    full = Entry(FULL, 0.80, latency_p95_ms=8.0, latency_p50_ms=8.0, label="full", shares=(0.1,) * 10)
    mid = Entry(MID, 0.75, latency_p95_ms=4.0, latency_p50_ms=4.0, label="mid", shares=(0.1,) * 10)
    jitter = [1.0] * 80 + [1.12] * 20  # one run in five is 12 % slow

    def controller(ladder: tuple) -> Controller:
        c = Controller([dataclasses.replace(full, ladder=ladder), mid], min_obs=4, price0=3.0)
        c._c.jitter.extend(jitter)
        c._refresh_tail()
        return c

    plain = controller(())
    assert plain.miss_risk(plain.entries[0], 8.6) == pytest.approx(0.2)  # 8.6 / 8 = 1.075 < 1.12
    assert plain.select(latency_ms=8.6).config == MID  # 0.80 - 3 x 0.2 < 0.75
    # dropping one block saves 10 % of the time: 1.12 x 0.9 x 1.05 < 1.075, so the slow runs are saved
    laddered = controller(((0.1, 0.78), (0.2, 0.74)))
    assert laddered.miss_risk(laddered.entries[0], 8.6) == 0.0
    assert laddered._outlook(laddered.entries[0], 8.6, 1)[1] == pytest.approx(0.8 * 0.80 + 0.2 * 0.78)
    assert laddered.select(latency_ms=8.6).config == FULL
    assert laddered.miss_risk(laddered.entries[0], 7.0) == pytest.approx(0.2)  # 1.12 x 0.8 x 1.05 > 7 / 8
    laddered.options = dataclasses.replace(laddered.options, rescue=False)  # without the deadline the ladder
    # does not apply
    assert laddered.select(latency_ms=8.6).config == MID


def test_measure_rescue_walks_each_paths_droppable_blocks() -> None:
    dm, x = _vit()
    n = len(dm.module.blocks)
    tokens = ExecConfig(token_keep=0.7, token_layers=(n - 1,))
    menu = [Entry(tokens, 0.70, latency_p95_ms=2.0, label="tokens"),
            Entry(FULL, 0.80, latency_p95_ms=8.0, label="full")]
    order = list(reversed(range(n)))
    c = Controller(menu, model=dm, drop_order=order).profile(x, runs=3, front=False)
    seen: list[ExecConfig] = []

    def quality_of(cfg: ExecConfig) -> float:
        seen.append(cfg)
        return 0.8 - 0.1 * len(cfg.skip_blocks)

    res = {e.label: e.residual for e in c.entries}  # what a dropped block still takes: timed by ``profile``
    assert res["full"] is None and len(res["tokens"]) == n + 2
    assert [j for j, r in enumerate(res["tokens"]) if r] == [n]  # stage n: block n - 1, the token layer
    c.measure_rescue(quality_of)
    by = {e.label: e for e in c.entries}
    t = by["tokens"]
    assert t.residual[n] <= t.shares[n] and t.ladder[0][0] == pytest.approx(t.shares[n] - t.residual[n])
    assert [q for _, q in by["full"].ladder] == pytest.approx([0.7, 0.6, 0.5])  # a quarter of 12 blocks
    saved = [s for s, _ in by["full"].ladder]
    assert saved == sorted(saved) and saved[0] > 0 and saved[-1] < 1
    assert all(FULL.replace(skip_blocks=tuple(range(n - k, n))) in seen for k in (1, 2, 3))
    # the token layer is dropped first as the others are, and still reduces its tokens
    assert tokens.replace(skip_keep_tokens=(n - 1,)) in seen
    assert tokens.replace(skip_keep_tokens=(n - 1,), skip_blocks=(n - 3, n - 2)) in seen
    assert tokens.replace(skip_blocks=(n - 1,)) not in seen and len(seen) == 6
    assert dm.exec_config == ExecConfig()
    with pytest.raises(DynavitError, match="block ranking"):
        Controller(menu, model=dm).measure_rescue(quality_of)


def test_server_runs_budgeted_requests_under_their_deadline(ticking, monkeypatch) -> None:
    """``serve --rescue``: a tight request's forward drops blocks to answer in time and says which."""
    require("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    import dynavit.serve.app as app_mod
    import dynavit.serve.batcher as batcher_mod

    for mod in (app_mod, batcher_mod):  # the server's clock is the ticking one
        monkeypatch.setattr(mod, "time", deadline_mod.time)
    dm, x = _vit()
    n = len(dm.module.blocks)
    menu = [Entry(SMALL, 0.70, latency_p95_ms=2.0, label="small"), Entry(FULL, 0.80, latency_p95_ms=8.0, label="full")]
    c = Controller(menu, model=dm, drop_order=list(reversed(range(1, n))), rescue_max_drop=n, min_obs=4
                   ).profile(x, runs=4, front=False).measure_rescue(lambda cfg: 0.5)
    tight = 0.6 * min(e.latency_p50_ms for e in c.entries)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 30)).save(buf, "PNG")
    post = {"content": buf.getvalue(), "headers": {"content-type": "image/png"}}
    with TestClient(app_mod.create_app(dm, c, max_wait_ms=0)) as client:
        r = client.post(f"/v1/infer?latency_ms={tight}", **post).json()
        assert len(r["dropped_blocks"]) == 6 and r["budget_met"] is True and r["model_ms"] <= tight
        assert r["executed_config"] == r["config"]["exec_config"] | {"skip_blocks": r["dropped_blocks"]}
        assert c.history[-1][2] > r["model_ms"]  # the speed is learnt from the pace, not the truncated run
        named = client.post(f"/v1/infer?config={r['config']['name']}", **post).json()
        assert named["dropped_blocks"] == [] and named["executed_config"] == named["config"]["exec_config"]
        roomy = client.post(f"/v1/infer?latency_ms={50 * tight}", **post).json()
        assert roomy["dropped_blocks"] == [] and roomy["budget_met"] is True
        assert "dynavit_rescued_total 1.0" in client.get("/metrics").text
