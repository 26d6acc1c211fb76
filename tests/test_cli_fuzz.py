"""Bad input to every command: exit code 2 and one line on stderr that names the problem, never a traceback.

The cases run in-process (typer's CliRunner); a few run as real processes to check that nothing
reaches stderr but the one line. Afterwards the stores and model folders the cases touched are
unchanged and still usable.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import child_env, damage_sqlite, make_row, tiny_vit
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dynavit.cli import app
from dynavit.config import ExecConfig
from dynavit.sweep.store import ResultStore

runner = CliRunner()
NOPE = "/proc/nope"  # a folder nothing can be written under, even as root

# (arguments, what the one line must name); {name} is a path made by the ``world`` fixture
CASES: list[tuple[str, list[str], str]] = [
    # usage errors of the root and of every command
    ("unknown-command", ["nope"], "No such command"),
    ("unknown-root-option", ["--nope"], "No such option"),
    ("profile-no-model", ["profile"], "Missing argument"),
    ("profile-batch-text", ["profile", "{model}", "--batch", "abc"], "--batch"),
    ("profile-size-one", ["profile", "{model}", "--input-size", "1"], "--input-size"),
    ("profile-unknown-option", ["profile", "{model}", "--bogus"], "No such option"),
    ("eval-no-data", ["eval", "{model}"], "--data"),
    ("eval-batch-text", ["eval", "{model}", "--data", "{labelled}", "--batch-size", "x"], "--batch-size"),
    ("calibrate-no-out", ["calibrate", "{model}", "--images", "{images}"], "--out"),
    ("sweep-no-data", ["sweep", "{model}"], "--data"),
    ("pareto-top-text", ["pareto", "{store}", "--top", "many"], "--top"),
    ("simulate-frames-text", ["simulate", "--store", "{store}", "--frames", "abc"], "--frames"),
    ("serve-port-text", ["serve", "--port", "http"], "--port"),
    ("infer-budget-text", ["infer", "{png}", "--latency-ms", "soon"], "--latency-ms"),
    ("train-steps-text", ["train", "{model}", "--data", "{labelled}", "--out", "{tmp}/run", "--steps", "x"],
     "--steps"),
    ("demo-limit-text", ["demo", "--limit", "abc"], "--limit"),
    ("accel-cost-no-arch", ["accel", "cost", "-"], "--arch"),
    ("accel-unknown", ["accel", "dse"], "Missing argument"),
    ("export-no-out", ["export", "{model}"], "Missing option"),
    ("predict-no-images", ["predict", "{model}"], "--images"),
    # models that cannot be opened
    ("hub-id-offline", ["profile", "someone/not-a-real-model-xyz"], "not-a-real-model-xyz"),
    ("missing-folder", ["profile", "./no/such/model"], "does not exist"),
    ("file-not-folder", ["profile", "{png}"], "not a Hugging Face model folder"),
    ("folder-without-config", ["profile", "{images}"], "config.json"),
    ("truncated-weights", ["profile", "{truncated}"], "model.safetensors"),
    ("config-field-text", ["profile", "{badconfig}"], "hidden_size"),
    ("pickle-weights", ["profile", "{pickle}"], "pytorch_model.bin is a pickle"),
    ("timm-missing", ["profile", "timm:vit_tiny_patch16_224"], "dynavit[timm]"),
    ("unknown-preset", ["profile", "config:nope-b9"], "nope-b9"),
    ("calibration-missing", ["profile", "{model}", "--calibration", "{tmp}/nocal"], "nocal"),
    # execution paths given as JSON
    ("heads-float", ["profile", "{model}", "--config", '{"heads": 2.5}'], "heads=2.5"),
    ("heads-text", ["profile", "{model}", "--config", '{"heads": "abc"}'], "heads"),
    ("heads-list-text", ["profile", "{model}", "--config", '{"heads": ["a", 1, 2]}'], "heads"),
    ("mlp-width-text", ["profile", "{model}", "--config", '{"mlp_width": "abc"}'], "mlp_width"),
    ("mlp-width-range", ["profile", "{model}", "--config", '{"mlp_width": 1.5}'], "mlp_width"),
    ("unknown-field", ["profile", "{model}", "--config", '{"nope": 1}'], "unknown ExecConfig field 'nope'"),
    ("config-file-missing", ["profile", "{model}", "--config", "x.json"], "x.json does not exist"),
    ("config-list", ["profile", "{model}", "--config", "[1, 2]"], "JSON object"),
    ("config-bad-json", ["profile", "{model}", "--config", "{bad json"], "JSON"),
    ("config-file-bad-json", ["profile", "{model}", "--config", "{garbage_json}"], "JSON"),
    ("skip-blocks-text", ["profile", "{model}", "--config", '{"skip_blocks": "0"}'], "skip_blocks"),
    ("skip-blocks-range", ["profile", "{model}", "--config", '{"skip_blocks": [99]}'], "skip_blocks"),
    ("resolution-negative", ["profile", "{model}", "--config", '{"resolution": -1}'], "resolution"),
    ("resolution-text", ["profile", "{model}", "--config", '{"resolution": "big"}'], "resolution"),
    ("token-method", ["profile", "{model}", "--config", '{"token_method": "zip"}'], "token_method"),
    ("granularity-zero", ["profile", "{model}", "--config", '{"granularity": 0}'], "granularity"),
    ("mux-bool", ["profile", "{model}", "--config", '{"mux": true}'], "mux"),
    ("token-fuse-text", ["profile", "{model}", "--config", '{"token_fuse": "yes"}'], "token_fuse"),
    ("threshold-text", ["profile", "{model}", "--config", '{"token_threshold": "x"}'], "token_threshold"),
    ("keep-text", ["profile", "{model}", "--config", '{"token_keep": "most"}'], "token_keep"),
    ("variant-unknown", ["profile", "{model}", "--config", '{"variant": "big"}'], "variant"),
    # outputs that cannot be written are refused before any work
    ("profile-json-nope", ["profile", "{model}", "--json", NOPE + "/p.json"], NOPE),
    ("profile-plot-nope", ["profile", "{model}", "--plot", NOPE + "/p.png"], NOPE),
    ("profile-json-folder", ["profile", "{model}", "--json", "{tmp}"], "is a folder"),
    ("eval-json-nope", ["eval", "{model}", "--data", "{labelled}", "--json", NOPE + "/e.json"], NOPE),
    ("calibrate-out-nope", ["calibrate", "{model}", "--images", "{images}", "--out", NOPE + "/cal"], NOPE),
    ("calibrate-out-file", ["calibrate", "{model}", "--images", "{images}", "--out", "{png}"], "not a folder"),
    ("simulate-json-nope", ["simulate", "--store", "{store}", "--json", NOPE + "/s.json"], NOPE),
    ("pareto-export-nope", ["pareto", "{store}", "--export", NOPE + "/rows.csv"], NOPE),
    ("export-out-nope", ["export", "{model}", "--out", NOPE + "/m.onnx"], NOPE),
    ("export-menu-out-file", ["export", "{model}", "--store", "{store}", "--out", "{png}"], "not a folder"),
    ("predict-out-nope", ["predict", "{model}", "--images", "{images}", "--out", NOPE + "/p.jsonl"], NOPE),
    ("report-out-nope", ["report", "{store}", "--out", NOPE + "/rep"], NOPE),
    ("train-out-nope", ["train", "{model}", "--data", "{labelled}", "--out", NOPE + "/run"], NOPE),
    ("demo-out-nope", ["demo", "--out", NOPE + "/demo"], NOPE),
    ("accel-cost-out-nope", ["accel", "cost", "-", "--arch", "simba-v16", "--store", "{store}", "--out",
                             NOPE + "/a"], NOPE),
    ("accel-dse-out-nope", ["accel", "dse", "-", "--store", "{store}", "--out", NOPE + "/d"], NOPE),
    # data
    ("eval-missing-data", ["eval", "{model}", "--data", "{tmp}/nodata"], "nodata"),
    ("eval-unlabelled", ["eval", "{model}", "--data", "{images}"], "has no labels"),
    ("eval-empty", ["eval", "{model}", "--data", "{empty}"], "empty"),
    ("eval-layout", ["eval", "{model}", "--data", "{labelled}", "--layout", "nope"], "nope"),
    ("calibrate-limit-zero", ["calibrate", "{model}", "--images", "{images}", "--out", "{tmp}/c", "--limit", "0"],
     "--limit"),
    ("calibrate-limit-negative", ["calibrate", "{model}", "--images", "{images}", "--out", "{tmp}/c", "--limit",
                                  "-5"], "--limit"),
    ("calibrate-criterion", ["calibrate", "{model}", "--images", "{images}", "--out", "{tmp}/c", "--criterion",
                             "nope"], "criterion"),
    ("calibrate-missing-images", ["calibrate", "{model}", "--images", "{tmp}/noimg", "--out", "{tmp}/c"], "noimg"),
    ("calibrate-no-images", ["calibrate", "{model}", "--images", "{empty}", "--out", "{tmp}/c"], "no images"),
    # stores
    ("sweep-foreign", ["sweep", "{model}", "--data", "{labelled}", "--store", "{foreign}"],
     "not a dynavit result store"),
    ("sweep-store-nope", ["sweep", "{model}", "--data", "{labelled}", "--store", NOPE + "/r.db"], "r.db"),
    ("sweep-damaged", ["sweep", "{model}", "--data", "{labelled}", "--store", "{damaged}"], "damaged"),
    ("sweep-strategy", ["sweep", "{model}", "--data", "{labelled}", "--store", "{tmp}/n.db", "--strategy", "nope"],
     "nope"),
    ("sweep-budget-zero", ["sweep", "{model}", "--data", "{labelled}", "--store", "{tmp}/n.db", "--budget", "0"],
     "at least 1"),
    ("sweep-backend", ["sweep", "{model}", "--data", "{labelled}", "--store", "{tmp}/n.db", "--backend", "spark"],
     "unknown backend"),
    ("sweep-space", ["sweep", "{model}", "--data", "{labelled}", "--store", "{tmp}/n.db", "--space", "nope"],
     "nope"),
    ("pareto-missing", ["pareto", "{tmp}/none.db"], "no result store"),
    ("pareto-foreign", ["pareto", "{foreign}"], "not a dynavit result store"),
    ("pareto-text-file", ["pareto", "{text}"], "not a dynavit result store"),
    ("pareto-damaged", ["pareto", "{damaged}"], "damaged"),
    ("pareto-cost", ["pareto", "{store}", "--cost", "nope"], "nope"),
    ("pareto-empty", ["pareto", "{empty_store}"], "no results"),
    ("pareto-export-suffix", ["pareto", "{store}", "--export", "{tmp}/rows.xlsx"], "rows.xlsx"),
    ("pareto-export-missing", ["pareto", "{tmp}/none.db", "--export", "{tmp}/rows.csv"], "no result store"),
    ("pareto-export-foreign", ["pareto", "{foreign}", "--export", "{tmp}/rows.csv"], "not a dynavit result store"),
    ("export-format", ["export", "{model}", "--out", "{tmp}/m.onnx", "--format", "tflite"], "tflite"),
    ("export-config-json", ["export", "{model}", "--out", "{tmp}/m.onnx", "--config", "{{"], "JSON"),
    ("export-config-knob", ["export", "{model}", "--out", "{tmp}/m.onnx", "--config", '{"wings": 2}'], "wings"),
    ("export-threshold", ["export", "{model}", "--out", "{tmp}/m.onnx", "--config",
                          '{"token_threshold": 0.5}'], "token_threshold"),
    ("export-store-and-config", ["export", "{model}", "--store", "{store}", "--out", "{tmp}/menu", "--config",
                                 '{"heads": 1}'], "--config"),
    ("export-missing-model", ["export", "./no/such/model", "--out", "{tmp}/m.onnx"], "does not exist"),
    ("predict-missing-images", ["predict", "{model}", "--images", "{tmp}/none"], "none"),
    ("predict-budget-no-store", ["predict", "{model}", "--images", "{images}", "--budget-ms", "5"], "give a store"),
    ("predict-config-heads", ["predict", "{model}", "--images", "{images}", "--config", '{"heads": 2.5}'], "heads"),
    ("predict-topk", ["predict", "{model}", "--images", "{images}", "--topk", "0"], "topk"),
    ("report-missing", ["report", "{tmp}/none.db", "--out", "{tmp}/rep"], "no result store"),
    ("report-damaged", ["report", "{damaged}", "--out", "{tmp}/rep"], "damaged"),
    ("report-foreign", ["report", "{foreign}", "--out", "{tmp}/rep"], "not a dynavit result store"),
    ("report-empty", ["report", "{empty_store}", "--out", "{tmp}/rep"], "no results"),
    # run time
    ("simulate-missing", ["simulate", "--store", "{tmp}/none.db"], "no result store"),
    ("simulate-profile-runs", ["simulate", "--store", "{store}", "--profile-runs", "2"], "at least 3"),
    ("simulate-load-at", ["simulate", "--store", "{store}", "--load-at", "2"], "--load-at"),
    ("simulate-threads", ["simulate", "--store", "{store}", "--threads", "0"], "--threads"),
    ("simulate-foreign", ["simulate", "--store", "{foreign}"], "not a dynavit result store"),
    ("simulate-model-gone", ["simulate", "--store", "{store}"], "gone-model"),
    ("serve-profile-runs", ["serve", "--store", "{store}", "--profile-runs", "2"], "at least 3"),
    ("serve-max-batch", ["serve", "--store", "{store}", "--max-batch", "0"], "--max-batch"),
    ("serve-missing", ["serve", "--store", "{tmp}/none.db"], "no result store"),
    ("infer-missing-image", ["infer", "{tmp}/none.png"], "none.png"),
    ("infer-no-server", ["infer", "{png}", "--url", "http://127.0.0.1:9"], "127.0.0.1:9"),
    # training
    ("train-mode", ["train", "{model}", "--data", "{labelled}", "--out", "{tmp}/run", "--mode", "nope"], "nope"),
    ("train-steps-zero", ["train", "{model}", "--data", "{labelled}", "--out", "{tmp}/run", "--steps", "0"],
     "at least 1"),
    ("train-densities", ["train", "{model}", "--data", "{labelled}", "--out", "{tmp}/run", "--densities", "a,b"],
     "--densities"),
    ("train-token-layers", ["train", "{model}", "--data", "{labelled}", "--out", "{tmp}/run", "--token-layers",
                            "x"], "--token-layers"),
    ("train-missing-data", ["train", "{model}", "--data", "{tmp}/nodata", "--out", "{tmp}/run"], "nodata"),
    # accelerator costs
    ("accel-arch", ["accel", "cost", "-", "--arch", "nope", "--store", "{store}"], "nope"),
    ("accel-store-missing", ["accel", "cost", "-", "--arch", "simba-v16", "--store", "{tmp}/none.db"],
     "no result store"),
    ("accel-configs-json", ["accel", "cost", "-", "--arch", "simba-v16", "--store", "{store}", "--configs",
                            "{bad"], "--configs"),
    ("accel-vector-sizes", ["accel", "dse", "-", "--store", "{store}", "--vector-sizes", "a,b"],
     "--vector-sizes"),
    ("accel-foreign", ["accel", "cost", "-", "--arch", "simba-v16", "--store", "{foreign}"],
     "not a dynavit result store"),
]


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()




def _store(path: Path, rows: int) -> Path:
    ident = {"model": "gone-model", "model_fingerprint": "f", "calibration": "none", "dataset_fingerprint": "d",
             "task": "classification", "metric": "top1", "protocol": {"seed": 0}}
    with ResultStore(path) as rs:
        rs.bind(ident)
        run = rs.start_run({"target": {"model": "gone-model", "data": str(path.parent / "gone-images")}})
        for i in range(rows):
            rs.add(make_row(ExecConfig(mlp_width=1.0 - 0.2 * i), np.ones((4, 2), np.uint8), 1e9 - i, run_id=run,
                            delta=0.0, delta_lo=-0.1, delta_hi=0.1))
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    model = tmp / "model"
    tiny_vit().save_pretrained(model)
    images, labelled, empty = tmp / "images", tmp / "labelled", tmp / "empty"
    for folder in (images, empty):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (labelled / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(labelled / f"c{i % 2}" / f"{i}.png")
    truncated, badconfig, pickle = tmp / "truncated", tmp / "badconfig", tmp / "pickle"
    for folder in (truncated, badconfig, pickle):
        folder.mkdir()
        (folder / "config.json").write_text((model / "config.json").read_text())
    weights = (model / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (badconfig / "model.safetensors").write_bytes(weights)
    (badconfig / "config.json").write_text((model / "config.json").read_text().replace(
        '"hidden_size": 32', '"hidden_size": "abc"'))
    torch.save(load_file(model / "model.safetensors"), pickle / "pytorch_model.bin")
    foreign = tmp / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE users (id INTEGER)")
    damaged = _store(tmp / "damaged.db", 3)
    damage_sqlite(damaged)
    (tmp / "text.txt").write_text("hello " * 200)
    (tmp / "garbage.json").write_text("{not json")
    png = tmp / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    return {"tmp": str(tmp), "model": str(model), "images": str(images), "labelled": str(labelled),
            "empty": str(empty), "truncated": str(truncated), "badconfig": str(badconfig), "pickle": str(pickle),
            "foreign": str(foreign), "damaged": str(damaged), "store": str(_store(tmp / "store.db", 3)),
            "empty_store": str(_store(tmp / "empty_store.db", 0)), "text": str(tmp / "text.txt"),
            "garbage_json": str(tmp / "garbage.json"), "png": str(png)}


def _args(args: list[str], world: dict[str, str]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: world.get(m.group(1), m.group(0)), a) for a in args]


def test_there_are_enough_cases_and_every_command_has_some() -> None:
    assert len(CASES) >= 80
    commands = {args[0] if args[0] != "accel" else f"accel {args[1]}" for _, args, _ in CASES}
    assert commands >= {"profile", "eval", "calibrate", "sweep", "pareto", "export", "predict", "report", "simulate",
                        "serve", "infer", "train", "demo", "accel cost", "accel dse"}


@pytest.mark.parametrize("args, needle", [(a, n) for _, a, n in CASES], ids=[c for c, _, _ in CASES])
def test_bad_input_is_one_line_and_exit_code_2(args, needle, world, monkeypatch) -> None:
    monkeypatch.chdir(world["tmp"])
    before = {k: _digest(Path(world[k])) for k in ("model", "store", "foreign", "damaged", "pickle")}
    res = runner.invoke(app, _args(args, world))
    text = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    assert "Traceback" not in res.output and "Traceback" not in text
    assert len(text.splitlines()) == 1 and text.startswith("error:"), text
    assert needle in text, text
    assert {k: _digest(Path(world[k])) for k in before} == before  # nothing it was given changed


def test_the_store_and_model_stay_usable(world) -> None:
    with ResultStore(world["store"], readonly=True) as rs:
        assert len(rs) == 3 and rs.rows()[0].per_image.shape == (4, 2)
    res = runner.invoke(app, ["pareto", world["store"]])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["profile", world["model"], "--repeats", "3", "--modules", "0"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("case", ["heads-float", "timm-missing"])
def test_a_real_process_prints_only_the_one_line(case, world) -> None:
    args, needle = next((a, n) for c, a, n in CASES if c == case)
    res = subprocess.run([sys.executable, "-m", "dynavit.cli", *_args(args, world)], capture_output=True, text=True,
                         env=child_env(), cwd=world["tmp"], timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error:") and needle in res.stderr, res.stderr


def test_the_api_refuses_bad_configs_where_they_are_made() -> None:
    """A bad value fails when the config is built (not at forward time), and configure() names a wrong type."""
    from dynavit.config import ConfigError

    for bad in ({"heads": 2.5}, {"heads": [2, "x", 2]}, {"mlp_width": "0.5"}, {"token_fuse": 1},
                {"resolution": 224.0}, {"skip_blocks": "01"}, {"token_threshold": "0.9"}, {"variant": 3}):
        with pytest.raises(ConfigError):
            ExecConfig(**bad)
    assert ExecConfig(heads=2.0).heads == 2 and ExecConfig(heads=[1.0, 2]).heads == (1, 2)  # JSON may write 2.0
    dm = tiny_vit()
    for wrong in ("mlp_width=0.5", 0.5, ["heads"]):
        with pytest.raises(ConfigError, match="configure\\(\\) takes an ExecConfig or a dict"):
            dm.configure(wrong)
    dm.configure({"heads": 1})
    assert dm.exec_config == ExecConfig(heads=1)
