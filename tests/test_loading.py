"""Loading from local folders, presets and configs; clear errors for everything else."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import SwinConfig, ViTForImageClassification

import dynavit
from dynavit.models.configs import preset_config, segformer_config


def test_local_deit_tiny(deit_tiny, deit_tiny_path):
    assert (deit_tiny.family, deit_tiny.task, deit_tiny.num_labels) == ("vit", "classification", 1000)
    assert deit_tiny.input_size == (224, 224)
    assert deit_tiny.id2label[0].startswith("tench")
    ref = ViTForImageClassification.from_pretrained(deit_tiny_path).eval()
    x = deit_tiny.example_input(2)
    with torch.no_grad():
        assert torch.equal(deit_tiny(x), ref(pixel_values=x).logits)
    t = deit_tiny.transform.to_dict()
    assert t["crop"] == [224, 224] and t["resize_shorter_side"] == 256 and t["interpolation"] == "bicubic"


def test_families_from_config():
    swin = dynavit.from_config(SwinConfig(embed_dim=24, depths=[1, 1], num_heads=[1, 2], image_size=64))
    assert swin.family == "swin" and swin(swin.example_input()).shape == (1, 2)
    seg = dynavit.from_config(segformer_config("b0", num_labels=11))
    assert seg.task == "segmentation" and seg.input_size == (512, 512)
    assert seg(seg.example_input(1, (64, 96))).shape == (1, 11, 16, 24)


def test_presets():
    assert preset_config("segformer-b2").decoder_hidden_size == 768
    assert dynavit.load("config:vit-t16").num_labels == 1000
    with pytest.raises(dynavit.DynavitError, match="unknown preset 'vit-x'.*segformer-b0"):
        dynavit.load("config:vit-x")


def test_input_size_rules():
    seg = dynavit.from_config(segformer_config("b0"))
    with pytest.raises(dynavit.DynavitError, match="multiples of 32"):
        seg.check_input_size(500, 512)
    swin = dynavit.load("config:swin-t")
    swin.check_input_size(256, 256)
    with pytest.raises(dynavit.DynavitError, match="multiples of 32"):
        swin.check_input_size(240, 240)
    with pytest.raises(dynavit.DynavitError, match="positive"):
        swin.check_input_size(0, 224)


def test_missing_and_bad_folders(tmp_path):
    with pytest.raises(dynavit.DynavitError, match="does not exist"):
        dynavit.load(str(tmp_path / "nope"))
    with pytest.raises(dynavit.DynavitError, match="config.json"):
        dynavit.load(tmp_path)


def test_offline_uncached_hub_id_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dynavit.DynavitError) as e:
        dynavit.load("facebook/this-model-does-not-exist-42")
    msg = str(e.value)
    assert "local model folder" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(dynavit.DynavitError, match="not supported"):
        dynavit.load(tmp_path)


def test_timm_path_with_stand_in_module(monkeypatch):
    """timm cannot import on this machine; the wrapping logic is checked against a stand-in."""
    created = {}

    def create_model(name, pretrained):
        created["name"], created["pretrained"] = name, pretrained
        m = torch.nn.Linear(3, 7)
        m.num_classes = 7
        return m

    fake = types.ModuleType("timm")
    fake.create_model = create_model
    fake_data = types.ModuleType("timm.data")
    fake_data.resolve_data_config = lambda _args, model: {
        "input_size": (3, 192, 160), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setitem(sys.modules, "timm.data", fake_data)
    lm = dynavit.load("timm:vit_tiny_patch16_224")
    assert created == {"name": "vit_tiny_patch16_224", "pretrained": True}
    assert (lm.family, lm.num_labels, lm.input_size, lm.crop_pct) == ("timm", 7, (192, 160), 0.9)
    dynavit.load("timm/deit_tiny_patch16_224.fb_in1k")
    assert created["name"] == "hf-hub:timm/deit_tiny_patch16_224.fb_in1k"


def test_timm_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(dynavit.DynavitError, match=r"dynavit\[timm\]"):
        dynavit.load("timm:vit_tiny_patch16_224")
