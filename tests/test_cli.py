"""The CLI: real runs end to end, and one-line errors (no traceback, non-zero exit) for bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

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
