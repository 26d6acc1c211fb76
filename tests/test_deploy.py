"""Paths to production: sliced standalone paths, ONNX / torch.export files, exported menus, ONNX Runtime, predict."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import Shapes, require, save_class_folders, tiny_vit
from transformers import SegformerConfig, SwinConfig
from typer.testing import CliRunner

import dynavit
from dynavit.cli import app
from dynavit.config import ExecConfig
from dynavit.data.files import read_image, read_label
from dynavit.deploy.export import export, load_program
from dynavit.deploy.slice import DeployError, parameter_count, path_module
from dynavit.runtime.run import forward
from dynavit.runtime.startup import start

RTOL = 1e-4  # of the largest logit


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(layers=4)


@pytest.fixture(scope="module")
def swin():
    return dynavit.from_config(SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=64, window_size=4,
                                          num_labels=5))


@pytest.fixture(scope="module")
def segformer():
    dm = dynavit.from_config(SegformerConfig(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 2, 4],
                                             depths=[1, 1, 1, 1], decoder_hidden_size=32, num_labels=4))
    dm.input_size = (64, 64)
    with torch.no_grad():  # non-trivial BN statistics, so cutting them is tested
        bn = dm.module.decoder.bn
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return dm


def eager(dm, cfg: ExecConfig, x: torch.Tensor) -> torch.Tensor:
    previous = dm.exec_config
    dm.configure(cfg)
    with torch.no_grad():
        out = dm(x)
    dm.configure(previous)
    return out


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= RTOL * float(ref.abs().max())


PATHS = [
    ("vit", {"mlp_width": 0.5}, True),  # width
    ("vit", {"heads": 1, "skip_blocks": [2]}, True),  # heads and depth
    ("vit", {"token_keep": 0.5, "token_layers": [1, 2], "token_fuse": True}, False),  # tokens, fixed keep rate
    ("vit", {"token_keep": 0.7, "token_method": "merge"}, False),
    ("vit", {"token_r": 4, "token_method": "merge"}, False),  # ToMe's constant r: static shapes
    ("vit", {"token_r": 6, "token_method": "prune+merge", "token_layers": [0, 2]}, False),
    ("vit", {"token_r": 4, "token_method": "merge", "skip_keep_tokens": [1]}, True),  # a deadline's drop: 1 reduces
    ("swin", {"heads": [1, 2, 3, 2], "mlp_width": 0.5, "skip_attn": [1]}, True),
    ("segformer", {"decoder_width": 0.5, "decoder_branches": [0, 1], "heads": 1, "mlp_width": 0.5}, True),
    ("segformer", {"resolution": [32, 32]}, False),  # antialiased downsizing inside the graph
]


@pytest.mark.parametrize(("family", "config", "smaller"), PATHS, ids=[f"{f}-{json.dumps(c)}" for f, c, _ in PATHS])
def test_onnx_runtime_runs_the_sliced_path_like_pytorch(request, tmp_path, family, config, smaller) -> None:
    ort = require("onnxruntime")
    dm = request.getfixturevalue(family)
    cfg = ExecConfig(**config)
    module = path_module(dm, cfg)
    full = parameter_count(dm.module)
    assert parameter_count(module) < full if smaller else parameter_count(module) == full
    assert dm.exec_config == ExecConfig()  # the model keeps its own path
    path = dm.export(tmp_path / "p.onnx", cfg)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch dimension stays dynamic
        x = dm.example_input(batch)
        ref = eager(dm, cfg, x)
        assert_close(module(x), ref)
        assert_close(torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0]), ref)


def test_sliced_file_is_smaller(vit, tmp_path) -> None:
    require("onnxruntime")
    full = vit.export(tmp_path / "full.onnx", ExecConfig())
    half = vit.export(tmp_path / "half.onnx", ExecConfig(mlp_width=0.5, heads=1))
    assert half.stat().st_size < 0.7 * full.stat().st_size


def test_torch_export_round_trip(vit, tmp_path) -> None:
    cfg = ExecConfig(mlp_width=0.5, token_keep=0.5)
    path = export(vit, tmp_path / "p.pt2", cfg, format="torch.export")
    program = load_program(path)
    for batch in (1, 4):
        x = vit.example_input(batch)
        assert_close(program(x), eager(vit, cfg, x))


def test_unexportable_path_says_why(vit, tmp_path) -> None:
    with pytest.raises(DeployError, match="data-dependent shapes"):
        vit.export(tmp_path / "t.onnx", ExecConfig(token_threshold=0.9))
    for fmt in ("onnx", "torch.export"):
        with pytest.raises(DeployError, match="precision int8 runs PyTorch's own packed kernels"):
            vit.export(tmp_path / "t.onnx", ExecConfig(precision="int8", mlp_width=0.5), format=fmt)
    with pytest.raises(DeployError, match="unknown export format"):
        vit.export(tmp_path / "t.onnx", format="tflite")
    assert not (tmp_path / "t.onnx").exists()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A saved tiny ViT, a labelled image folder, a grid sweep of it, and the images again with a corrupt file."""
    from dynavit.train.supervised import export as save_model

    root = tmp_path_factory.mktemp("deploy")
    save_model(tiny_vit(layers=4), root / "vit", {"name": "tiny"})
    save_class_folders(Shapes(10), root / "data")
    (root / "space.json").write_text('{"mlp_width": [1.0, 0.5], "heads": [2, 1]}')
    res = CliRunner().invoke(app, ["sweep", str(root / "vit"), "--data", str(root / "data"), "--space",
                                   str(root / "space.json"), "--strategy", "grid", "--latency-repeats", "2",
                                   "--store", str(root / "s.db")])
    assert res.exit_code == 0, res.output
    shutil.copytree(root / "data", root / "photos")  # what predict reads: the sweep's images and a corrupt file
    (root / "photos" / "c0" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def menu_folder(swept):
    """``dynavit export MODEL --store DB --out DIR``: the sweep's menu as ONNX files and menu.json."""
    require("onnxruntime")
    out = swept / "menu"
    res = CliRunner().invoke(app, ["export", str(swept / "vit"), "--store", str(swept / "s.db"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_menu_folder_runs_on_onnx_runtime_with_the_controller(swept, menu_folder) -> None:
    from dynavit.deploy.onnxrt import OnnxPaths

    out = menu_folder
    meta = json.loads((out / "menu.json").read_text())
    assert meta["task"] == "classification" and meta["paths"] and meta["skipped"] == []
    for p in meta["paths"]:
        assert (out / p["file"]).is_file() and 0 <= p["quality"] <= 1 and p["gmacs"] > 0 and p["parameters"] > 0
    dm, paths = dynavit.load(swept / "vit"), OnnxPaths(out)
    x = dm.example_input(2)
    for e in paths.entries:
        assert_close(paths.configure(e.config)(x), eager(dm, e.config, x))
    s = start(None, out, runtime="onnxruntime", profile_runs=3)
    assert s.model is not dm and not s.controller.can_rescue and s.controller.entries
    choice = s.controller.select(latency_ms=1e3)
    ran = forward(s.model, choice.config, x[:1])
    assert_close(ran.output, eager(dm, choice.config, x[:1])) and ran.ms > 0
    with pytest.raises(dynavit.DynavitError, match="cannot drop blocks"):
        start(None, out, runtime="onnxruntime", profile_runs=3, rescue=True)


def test_start_on_compiled_paths(swept) -> None:
    """``serve --compile`` / ``simulate --compile``: the menu's paths compiled once (Dynamo's cheap eager backend)."""
    from dynavit.deploy.compiled import CompiledPaths, compile_count

    s = start(swept / "s.db", profile_runs=3, images=True, compile="eager")
    assert isinstance(s.model, CompiledPaths) and not s.model.failed and not s.controller.can_rescue
    dm = dynavit.load(swept / "vit")
    x, warmed = dm.example_input(1), compile_count()
    for e in s.controller.entries:
        assert_close(forward(s.model, e.config, x).output, eager(dm, e.config, x))
        assert 0 <= s.quality_of(e.config) <= 1
    assert compile_count() == warmed


def test_served_from_onnx_runtime(swept, menu_folder) -> None:
    require("fastapi")
    from fastapi.testclient import TestClient

    from dynavit.serve import load_for_store
    from dynavit.serve.app import create_app

    model, ctrl = load_for_store(str(menu_folder), "unused.db", profile_runs=3, runtime="onnxruntime")
    dm = dynavit.load(swept / "vit")
    with TestClient(create_app(model, ctrl)) as client:
        assert len(client.get("/v1/configs").json()["configs"]) == len(ctrl.entries)
        body = (swept / "data" / "c1" / "1.png").read_bytes()
        r = client.post("/v1/infer", params={"latency_ms": 1000}, content=body, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        answer = r.json()
        cfg = next(e.config for e in ctrl.entries if e.label == answer["config"]["label"])
        probs = eager(dm, cfg, dm.transform(read_image(swept / "data" / "c1" / "1.png"))[None]).softmax(-1)[0]
        assert answer["topk"][0]["index"] == int(probs.argmax())


def test_predict_over_a_folder_counts_bad_files(swept, segformer, tmp_path) -> None:
    dm = dynavit.load(swept / "vit")
    res = dynavit.predict(dm, swept / "photos", config={"mlp_width": 0.5}, topk=3)
    assert len(res) == 10 and len(res.bad) == 1 and res.bad[0].endswith("broken.png")
    assert res.config == ExecConfig(mlp_width=0.5)
    files = [r["file"] for r in res]
    assert "c0/broken.png" not in files and len(set(files)) == 10
    first = res.records[0]
    x = dm.transform(read_image(swept / "photos" / first["file"]))[None]
    probs = eager(dm, ExecConfig(mlp_width=0.5), x).softmax(-1)[0]
    assert first["topk"][0]["index"] == int(probs.argmax())
    assert first["topk"][0]["probability"] == pytest.approx(float(probs.max()), rel=1e-5)
    seg = dynavit.predict(segformer, swept / "photos", masks=tmp_path / "masks")
    assert len(seg) == 10 and len(seg.bad) == 1
    mask = read_label(tmp_path / "masks" / files[0])
    assert mask.shape == (64, 64) and mask.max() < 4


def test_cli_export_and_predict(swept, tmp_path) -> None:
    require("onnxruntime")
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(swept / "vit"), "--config", '{"mlp_width": 0.5}', "--out",
                              str(tmp_path / "p.onnx")])
    assert res.exit_code == 0 and (tmp_path / "p.onnx").is_file(), res.output
    res = runner.invoke(app, ["export", str(swept / "vit"), "--config", '{"token_threshold": 0.9}', "--out",
                              str(tmp_path / "t.onnx")])
    assert res.exit_code == 2 and "data-dependent" in res.output
    res = runner.invoke(app, ["predict", str(swept / "vit"), "--images", str(swept / "photos"), "--out",
                              str(tmp_path / "preds.jsonl"), "--budget-ms", "1000", "--store", str(swept / "s.db")])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "preds.jsonl").read_text().splitlines()
    assert len(lines) == 10 and "1 unreadable" in res.output
    assert all(len(json.loads(line)["topk"]) == 5 for line in lines)
    res = runner.invoke(app, ["predict", str(swept / "vit"), "--images", str(swept / "data"), "--budget-ms", "5"])
    assert res.exit_code == 2 and "store" in res.output
