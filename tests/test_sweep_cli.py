"""`dynavit sweep / pareto / export` end to end: kill -9 and resume, read-only stores, Ray vs local."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import require

from dynavit.sweep.store import ResultStore

DYNAVIT = [sys.executable, "-m", "dynavit.cli"]


def _sweep_args(assets: Path, store: Path, budget: int = 6, *extra: str) -> list[str]:
    return [*DYNAVIT, "sweep", str(assets / "models" / "deit-tiny-patch16-224"),
            "--data", str(assets / "imagenet-samples"), "--limit", "16", "--batch-size", "8",
            "--space", "small", "--strategy", "evolutionary", "--budget", str(budget), "--store", str(store),
            "--latency-repeats", "2", *extra]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, **kw)


def _rows(store: Path) -> dict[str, tuple]:
    with ResultStore(store, readonly=True) as rs:
        return {r.key: (r.quality, r.macs, r.per_image.tobytes(), r.delta) for r in rs.rows()}


def test_killed_sweep_resumes_with_exactly_the_rows_of_an_uninterrupted_one(assets, tmp_path) -> None:
    whole, killed = tmp_path / "whole.db", tmp_path / "killed.db"
    done = _run(_sweep_args(assets, whole))
    assert done.returncode == 0, done.stderr
    assert "Pareto front" in done.stdout

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_sweep_args(assets, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 300
    n = 0
    while time.time() < deadline and proc.poll() is None:
        if killed.exists():
            try:
                n = sqlite3.connect(f"file:{killed}?mode=ro", uri=True).execute(
                    "SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
        if n >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _rows(killed)
    assert 2 <= len(partial) < 6

    resumed = _run(_sweep_args(assets, killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(partial)} already in" in resumed.stdout
    a, b = _rows(whole), _rows(killed)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        assert a[k] == b[k]  # quality, MACs, per-image hits and paired delta: identical
    with ResultStore(killed, readonly=True) as rs:
        statuses = [s for (s,) in rs.conn.execute("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["running", "done"]  # the killed run never got to say it finished

    # a longer budget continues the same search, reusing every stored row
    more = _run(_sweep_args(assets, killed, 8))
    assert more.returncode == 0 and "6 already in" in more.stdout and len(_rows(killed)) == 8

    pareto = _run([*DYNAVIT, "pareto", str(killed), "--cost", "latency_p50_ms", "--all"])
    assert pareto.returncode == 0 and pareto.stdout.count("│") > 8 * 5
    out = _run([*DYNAVIT, "pareto", str(killed), "--export", str(tmp_path / "rows.csv")])
    assert out.returncode == 0 and len((tmp_path / "rows.csv").read_text().splitlines()) == 9

    sim = _run([*DYNAVIT, "simulate", "--store", str(killed), "--trace", "step", "--frames", "8", "--interleave",
                "--json", str(tmp_path / "sim.json")])
    assert sim.returncode == 0, sim.stderr
    sim_json = json.loads((tmp_path / "sim.json").read_text())
    policies = sim_json["policies"]
    assert [p["policy"] for p in policies] == ["controller", "uncorrected", "default", "smallest", "static", "oracle"]
    assert all(p["frames"] == 8 for p in policies)
    oracle = next(p for p in policies if p["policy"] == "oracle")
    assert set(sim_json["bounds"]) == {"speed known", "speed unknown"} and "bound: speed known" in sim.stdout
    assert all(b["menu_quality"] <= oracle["menu_quality"] + 1e-9 for b in sim_json["bounds"].values())
    assert all(p["rescued"] == 0 for p in policies if p["policy"] != "controller")  # only the controller rescues
    assert all(0 <= p["menu_quality"] <= 1 for p in policies)  # rescued frames scored by the path that ran, never NaN
    # the menu was measured on one half of the sweep's 16 images, the frames came from the other half
    assert sim_json["overlap"] == 0 and len(sim_json["menu_images"]) == len(sim_json["frame_images"]) == 8
    assert not set(sim_json["menu_images"]) & set(sim_json["frame_images"])
    assert all(0 <= p["held_out_quality"] <= 1 and p["miss_ci"][0] <= p["miss_rate"] <= p["miss_ci"][1]
               for p in policies)


def test_read_only_store_is_a_clear_error_and_stays_intact(assets, tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    store = folder / "r.db"
    assert _run(_sweep_args(assets, store, 3)).returncode == 0
    before = _rows(store)
    for extra in ("-wal", "-shm"):
        Path(f"{store}{extra}").unlink(missing_ok=True)
    args = _sweep_args(assets, store, 5)
    if os.geteuid() != 0:
        store.chmod(0o444)
        folder.chmod(0o555)
        res = _run(args)
        folder.chmod(0o755)
    else:  # root ignores permissions: a read-only bind mount in a private user + mount namespace
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare: cannot make a read-only folder")
        cmd = " ".join(f"'{a}'" for a in args)
        res = _run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}' && {cmd}"])
        if "mount" in res.stderr and "denied" in res.stderr:
            pytest.skip(f"user namespaces unavailable: {res.stderr.strip()}")
    assert res.returncode == 2, res.stderr
    assert "read-only" in res.stderr and "Traceback" not in res.stderr
    assert _rows(store) == before


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "random", "--budget", "0"], "at least 1"),
    (["--space", "{}"], "neither a preset"),
    (["--backend", "spark"], "unknown backend"),
])
def test_bad_sweep_arguments(assets, tmp_path, extra, message) -> None:
    res = _run(_sweep_args(assets, tmp_path / "r.db", 3, *extra))
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_strategy_without_budget_and_empty_space(assets, tmp_path) -> None:
    args = [a for a in _sweep_args(assets, tmp_path / "r.db") if a not in ("--budget", "6")]
    res = _run(args)
    assert res.returncode == 2 and "needs --budget" in res.stderr
    empty = tmp_path / "space.json"
    empty.write_text("{}")
    res = _run([*_sweep_args(assets, tmp_path / "r.db"), "--space", str(empty)])
    assert res.returncode == 2 and "search space is empty" in res.stderr


def test_pareto_of_a_missing_or_foreign_file(tmp_path) -> None:
    res = _run([*DYNAVIT, "pareto", str(tmp_path / "none.db")])
    assert res.returncode == 2 and "no result store" in res.stderr
    (tmp_path / "x.db").write_text("hello " * 200)
    res = _run([*DYNAVIT, "pareto", str(tmp_path / "x.db")])
    assert res.returncode == 2 and "not a dynavit result store" in res.stderr


def test_ray_and_local_backends_give_identical_quality_and_macs(assets, tmp_path) -> None:
    require("ray")
    from dynavit.sweep.run import SweepTarget, run_sweep

    target = SweepTarget(model=str(assets / "models" / "deit-tiny-patch16-224"),
                         data=str(assets / "imagenet-samples"), limit=16, batch_size=8, n_boot=200,
                         latency_repeats=2)
    kw = {"space": "small", "strategy": "random", "budget": 5, "progress": False}
    local = run_sweep(target, store=tmp_path / "local.db", backend="local", **kw)
    ray_run = run_sweep(target, store=tmp_path / "ray.db", backend="ray", workers=2, **kw)
    assert ray_run.measured == 5
    a = {r.key: r for r in local.rows}
    b = {r.key: r for r in ray_run.rows}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].quality == b[k].quality and a[k].macs == b[k].macs
        assert a[k].macs_by_class == b[k].macs_by_class
        assert np.array_equal(a[k].per_image, b[k].per_image)
        assert (a[k].delta, a[k].delta_lo, a[k].delta_hi) == (b[k].delta, b[k].delta_lo, b[k].delta_hi)
