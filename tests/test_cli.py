"""The CLI: real runs end to end, and one-line errors (no traceback, non-zero exit) for bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

import dynavit
from dynavit.cli import app

runner = CliRunner()


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error:")
    for n in needles:
        assert n in text, text


def test_unknown_model():
    one_line_error(runner.invoke(app, ["profile", "someone/not-a-real-model-xyz"]), "not-a-real-model-xyz")


def test_missing_model_folder(tmp_path):
    one_line_error(runner.invoke(app, ["profile", str(tmp_path / "missing")]), "does not exist")


def test_bad_input_size(deit_tiny_path):
    one_line_error(runner.invoke(app, ["profile", str(deit_tiny_path), "--input-size", "100", "100"]),
                   "100x100", "multiples of 16")


def test_missing_data_folder(deit_tiny_path, tmp_path):
    one_line_error(runner.invoke(app, ["eval", str(deit_tiny_path), "--data", str(tmp_path / "nodata")]),
                   "nodata")


def test_empty_dataset(deit_tiny_path, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "synset_words.txt").write_text("n01440764 tench, Tinca tinca\n")
    one_line_error(runner.invoke(app, ["eval", str(deit_tiny_path), "--data", str(tmp_path)]), "no images")


@pytest.fixture()
def tiny_imagenet(tmp_path, assets):
    """Three real sample photos plus one corrupt file, in the flat ImageNet layout."""
    src = assets / "imagenet-samples"
    (tmp_path / "images").mkdir()
    (tmp_path / "synset_words.txt").write_text((src / "synset_words.txt").read_text())
    for p in sorted((src / "images").iterdir())[:3]:
        Image.open(p).save(tmp_path / "images" / p.name)
    (tmp_path / "images" / "n01440764_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path


def test_corrupt_image_stops_or_is_skipped(deit_tiny_path, tiny_imagenet, tmp_path):
    one_line_error(runner.invoke(app, ["eval", str(deit_tiny_path), "--data", str(tiny_imagenet)]),
                   "n01440764_broken.JPEG")
    out = tmp_path / "m.json"
    args = ["eval", str(deit_tiny_path), "--data", str(tiny_imagenet), "--skip-bad", "--json", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["n_skipped"] == 1 and d["n_images"] == 3
    assert set(d["metrics"]["top1"]) >= {"value", "ci_low", "ci_high"}


def test_profile_writes_json_and_plot(tmp_path):
    r = runner.invoke(app, ["profile", "config:segformer-b0", "--input-size", "128", "128", "--repeats", "2",
                            "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["input_shape"] == [1, 3, 128, 128] and d["total_macs"] > 0
    assert any(m["name"] == "decoder.fuse" for m in d["modules"])
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "attention" in r.output


def test_calibrate_then_eval_on_a_path(deit_tiny_path, tiny_imagenet, assets, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted((assets / "camvid" / "val" / "images").iterdir())[:4]:
        Image.open(p).save(frames / p.name)
    r = runner.invoke(app, ["calibrate", str(deit_tiny_path), "--images", str(frames), "--out", str(tmp_path / "cal"),
                            "--criterion", "magnitude"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cal" / "calibration.safetensors").is_file()
    meta = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    ridges = meta["compensation"]["ridges"]
    assert (meta["compensation"]["method"] == "matrix") == bool(ridges)
    for group, ridge in ridges.items():  # the chosen ridges are said and saved
        assert f"{group} ridge {ridge:g}" in " ".join(r.output.split()), r.output
    out = tmp_path / "m.json"
    args = ["eval", str(deit_tiny_path), "--data", str(tiny_imagenet), "--skip-bad", "--calibration",
            str(tmp_path / "cal"), "--config", '{"mlp_width": 0.75, "token_keep": 0.8}', "--json", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["config"] == {"mlp_width": 0.75, "token_keep": 0.8}
    bad = args[:-2]
    bad[bad.index("--config") + 1] = '{"mlp_width": 2}'
    one_line_error(runner.invoke(app, bad), "mlp_width=2.0", "(0, 1]")
    one_line_error(runner.invoke(app, ["calibrate", str(deit_tiny_path), "--images", str(tmp_path / "none"),
                                       "--out", str(tmp_path / "c2")]), "does not exist")


def test_every_command_is_on_the_entry_point():
    import tomllib
    from pathlib import Path

    import dynavit.cli

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["dynavit"].partition(":")
    assert module == "dynavit.cli" and callable(getattr(dynavit.cli, func))
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("profile", "eval", "calibrate", "sweep", "pareto", "export", "predict", "report", "simulate", "serve",
                "infer", "train", "demo", "accel"):
        assert f" {cmd} " in r.output, cmd
    r = runner.invoke(app, ["accel", "--help"])
    assert r.exit_code == 0 and " cost " in r.output and " dse " in r.output


def test_bad_train_mode_and_numbers(tmp_path):
    base = ["train", "config:vit-tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    one_line_error(runner.invoke(app, [*base, "--mode", "bogus"]), "--mode bogus does not exist")
    one_line_error(runner.invoke(app, [*base, "--densities", "0.8,x"]), "--densities", "'0.8,x'")


def test_infer_without_image_or_server(tmp_path):
    import socket

    one_line_error(runner.invoke(app, ["infer", str(tmp_path / "none.jpg")]), "none.jpg", "does not exist")
    image = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(image)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_line_error(runner.invoke(app, ["infer", str(image), "--url", f"http://127.0.0.1:{port}"]), "cannot reach")


def test_configs_inline_or_from_a_file(tmp_path):
    from dynavit.config import ExecConfig
    from dynavit.configured import parse_config, parse_configs

    many = "[" + ", ".join(['{"mlp_width": 0.5}'] * 40) + "]"  # longer than a file name may be
    assert parse_configs(many) == [ExecConfig(mlp_width=0.5)] * 40
    (tmp_path / "c.json").write_text('{"heads": 2}')
    assert parse_config(str(tmp_path / "c.json")) == ExecConfig(heads=2)
    with pytest.raises(dynavit.DynavitError, match="JSON list"):
        parse_configs('{"heads": 2}')
