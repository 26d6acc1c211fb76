"""Result stores under misuse: foreign databases, two writers, damaged files, images that moved."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import child_env, damage_sqlite, make_row
from typer.testing import CliRunner

from dynavit.cli import app
from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.sweep import lease
from dynavit.sweep.store import ResultStore, StoreError, images_at

DYNAVIT = [sys.executable, "-m", "dynavit.cli"]
IDENTITY = {"model": "m", "model_fingerprint": "f", "calibration": "none", "dataset_fingerprint": "d",
            "task": "classification", "metric": "top1", "protocol": {"seed": 0}}
runner = CliRunner()




def _sweep(assets: Path, store: Path, data: str | Path, budget: int = 3, **kw) -> list[str]:
    return [*DYNAVIT, "sweep", str(assets / "models" / "deit-tiny-patch16-224"), "--data", str(data),
            "--limit", "8", "--batch-size", "8", "--space", "small", "--strategy", "random", "--budget",
            str(budget), "--store", str(store), "--latency-repeats", "2"]


def _one_line_error(stderr: str, needle: str) -> None:
    text = stderr.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:"), text
    assert needle in text, text


def _store_with_rows(path: Path, n: int = 3) -> None:
    with ResultStore(path) as rs:
        rs.bind(IDENTITY)
        run = rs.start_run({"target": {"model": "m", "data": "/nowhere"}})
        for i in range(n):
            rs.add(make_row(ExecConfig(mlp_width=1.0 - 0.1 * i), np.ones((4, 2), np.uint8), 1e9 - i, run_id=run))


# ------------------------------------------------------------------------------- foreign databases


def test_a_foreign_database_is_refused_and_left_byte_for_byte(tmp_path) -> None:
    db = tmp_path / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users VALUES (1, 'ada')")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(StoreError, match="not a dynavit result store.*users.*left untouched"):
        ResultStore(db)
    res = runner.invoke(app, ["sweep", "any-model", "--data", str(tmp_path), "--store", str(db)])
    assert res.exit_code == 2
    _one_line_error(res.stderr, "not a dynavit result store")
    for cmd in (["pareto", str(db)], ["pareto", str(db), "--export", str(tmp_path / "x.csv")], ["report", str(db)]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, (cmd, res.output)
        _one_line_error(res.stderr, "not a dynavit result store")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no journal, no WAL files, no export


def test_an_empty_database_becomes_a_store(tmp_path) -> None:
    (tmp_path / "empty.db").write_bytes(b"")
    sqlite3.connect(tmp_path / "blank.db").close()
    for name in ("empty.db", "blank.db"):
        _store_with_rows(tmp_path / name, 1)
        with ResultStore(tmp_path / name, readonly=True) as rs:
            assert len(rs) == 1


# ---------------------------------------------------------------------------------- two writers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant_owner(path: Path, pid: int, host: str, age: float = 0.0) -> None:
    con = sqlite3.connect(path)
    lease._ensure(con)
    now = time.time() - age
    con.execute("INSERT OR REPLACE INTO lease VALUES (1, ?, ?, ?, ?)", (pid, host, now, now))
    con.commit()
    con.close()


def test_a_live_writer_holds_the_store_and_a_dead_one_gives_way(tmp_path) -> None:
    db = tmp_path / "r.db"
    _store_with_rows(db)
    here = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        _plant_owner(db, alive.pid, here)
        with ResultStore(db) as rs, pytest.raises(StoreError, match=f"another sweep \\(pid {alive.pid} on"):
            rs.acquire()
        alive.kill()
    alive.wait()
    for pid, host, age in ((_dead_pid(), here, 0.0), (1, "elsewhere", 2 * lease.EXPIRE_S)):
        _plant_owner(db, pid, host, age)
        with ResultStore(db) as rs:
            rs.acquire()  # the owner died: its lease is taken over
            assert len(rs) == 3
        with ResultStore(db, readonly=True) as rs:  # and given back on close
            assert rs.conn.execute("SELECT COUNT(*) FROM lease").fetchone()[0] == 0
    _plant_owner(db, 1, "elsewhere", 10.0)  # a recent heartbeat on another host: alive
    with ResultStore(db) as rs, pytest.raises(StoreError, match="on elsewhere"):
        rs.acquire()


def test_two_sweep_processes_on_one_store_never_duplicate_work(assets, tmp_path) -> None:
    store = tmp_path / "r.db"
    data = assets / "imagenet-samples"
    first = subprocess.Popen(_sweep(assets, store, data), env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if sqlite3.connect(f"file:{store}?mode=ro", uri=True).execute("SELECT pid FROM lease").fetchone():
                break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    second = subprocess.run(_sweep(assets, store, data), env=child_env(), capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    _one_line_error(second.stderr, "is being written by another sweep")
    with ResultStore(store, readonly=True) as rs:
        assert len(rs) == 3
        assert [s for (s,) in rs.conn.execute("SELECT status FROM runs")] == ["done"]  # one run measured
    again = subprocess.run(_sweep(assets, store, data), env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "measured 0 configs, 3 already in" in again.stdout, again.stderr


# ----------------------------------------------------------------------------------- damaged files




def test_a_damaged_store_is_one_line_for_every_reader(tmp_path) -> None:
    db = tmp_path / "r.db"
    _store_with_rows(db)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damage_sqlite(db)
    for cmd in (["report", str(db), "--out", str(tmp_path / "rep")], ["pareto", str(db)],
                ["pareto", str(db), "--export", str(tmp_path / "x.csv")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, (cmd, res.output)
        _one_line_error(res.stderr, "is damaged")


def test_a_damaged_row_is_named(tmp_path) -> None:
    db = tmp_path / "r.db"
    _store_with_rows(db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE results SET config='{not json' WHERE id=2")
    with ResultStore(db, readonly=True) as rs, pytest.raises(StoreError, match="row 2 .* is damaged"):
        rs.rows()
    res = runner.invoke(app, ["report", str(db), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 2
    _one_line_error(res.stderr, "row 2")


# ------------------------------------------------------------------------------------ moved images


def test_the_store_records_absolute_paths_and_moved_images_can_be_named(assets, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "imgs").symlink_to(assets / "imagenet-samples")
    store = work / "r.db"
    res = subprocess.run(_sweep(assets, Path("r.db"), "imgs", budget=2), cwd=work, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with ResultStore(store, readonly=True) as rs:
        target = rs.last_target()
    assert Path(target["data"]).is_absolute() and Path(target["model"]).is_absolute()

    # the images move: the store says so and takes --data to find them
    with sqlite3.connect(store) as con:
        args = json.loads(con.execute("SELECT args FROM runs").fetchone()[0])
        args["target"]["data"] = str(tmp_path / "gone")
        con.execute("UPDATE runs SET args=?", (json.dumps(args),))
    from dynavit.sweep.run import SweepTarget

    with ResultStore(store, readonly=True) as rs:
        moved = SweepTarget(**rs.last_target())
        with images_at(assets / "imagenet-samples"):
            found = SweepTarget(**rs.last_target())
    with pytest.raises(DynavitError, match="no longer at .*gone; pass --data"):
        moved.images(None)
    assert found.data == str((assets / "imagenet-samples").resolve())
    base = ["simulate", "--store", str(store), "--trace", "step", "--frames", "4", "--profile-runs", "0",
            "--no-rescue"]
    res = subprocess.run([*DYNAVIT, *base], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    _one_line_error(res.stderr, "pass --data")
    res = subprocess.run([*DYNAVIT, *base, "--data", str(assets / "imagenet-samples")], cwd=tmp_path, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
