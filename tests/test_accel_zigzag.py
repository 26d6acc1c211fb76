"""The accelerator template (``accel.arch``) and the ZigZag bridge (``accel.zigzag``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import require  # noqa: E402

require("zigzag")  # the accel extra, part of the dev install: CI fails rather than skips
onnx = require("onnx")

from dynavit.accel.arch import PRESETS, Arch, sram_pj_per_bit  # noqa: E402
from dynavit.accel.layers import MacOp  # noqa: E402
from dynavit.accel.zigzag import (  # noqa: E402
    LayerCost,
    ZigzagDesign,
    cost_mac_op,
    spatial_mapping,
    workload_layer,
)
from dynavit.accel.zigzag_onnx import mac_ops_from_onnx, reproduce_zigzag_example  # noqa: E402
from dynavit.errors import DynavitError  # noqa: E402

ZIGZAG = Path(__import__("zigzag").__file__).parent
TPU_HW, TPU_MAP = ZIGZAG / "inputs/hardware/tpu_like.yaml", ZIGZAG / "inputs/mapping/tpu_like.yaml"
RESNET18 = ZIGZAG / "inputs/workload/resnet18.onnx"

# DeiT-tiny's layer shapes (197 tokens, width 192, 3 heads of 64, MLP 768)
QKV = MacOp("linear", B=197, K=576, C=192)
PROJ = MacOp("linear", B=197, K=192, C=192)
QK = MacOp("attention", B=197, K=197, C=64, G=3)
AV = MacOp("attention", B=197, K=64, C=197, G=3)
PATCH = MacOp("conv", B=1, K=192, C=3, OY=14, OX=14, FY=16, FX=16, SY=16, SX=16)


@pytest.fixture(scope="module")
def v16() -> Arch:
    return Arch.preset("simba-v16")


# --- the design template ------------------------------------------------------------------
def test_presets_share_peak_and_differ_in_vector_size():
    assert {"simba-v8", "simba-v16", "simba-v32", "simba-v64"} <= set(PRESETS)
    for name, arch in PRESETS.items():
        assert Arch.preset(name) is arch and arch.name == name
        assert arch.peak_macs_per_cycle == 1024
    assert sorted(PRESETS[f"simba-v{v}"].vector_size for v in (8, 16, 32, 64)) == [8, 16, 32, 64]
    assert len({a.key() for a in PRESETS.values()}) == len(PRESETS)
    with pytest.raises(DynavitError, match="simba-v16"):
        Arch.preset("no-such-design")


def test_key_is_stable_and_follows_every_field(v16):
    assert v16.key() == Arch.from_dict(v16.to_dict()).key()
    assert v16.key() == Arch.from_dict({**v16.to_dict(), "global_buffer_kib": 64, "vector_size": 16.0}).key()
    assert v16.with_(global_buffer_kib=128).key() != v16.key()
    assert v16.with_(dram_pj_per_bit=5.0).key() != v16.key()


def test_buffer_energy_grows_with_size_and_can_be_set(v16):
    assert sram_pj_per_bit(64) > sram_pj_per_bit(8)
    bigger = v16.with_(global_buffer_kib=4 * v16.global_buffer_kib)
    assert bigger.buffer_pj_per_bit("global") > v16.buffer_pj_per_bit("global")
    assert v16.with_(global_buffer_pj_per_bit=0.5).global_buffer_read_pj_per_bit == 0.5


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "design.yaml"
    p.write_text(text)
    return p


def test_yaml_with_a_preset_base_overrides_fields(tmp_path):
    a = Arch.from_yaml(_write(tmp_path, "preset: simba-v16\nglobal_buffer_kib: 256\nname: big\n"))
    assert a.name == "big" and a.global_buffer_kib == 256 and a.vector_size == 16
    assert Arch.from_yaml(a.to_yaml(tmp_path / "again.yaml")) == a


@pytest.mark.parametrize(("text", "field"), [
    ("name: x\nvector_size: 8\nlanes: 8\npes: 16\nweight_buffer_kib: 32\ninput_buffer_kib: 8\n"
     "accum_buffer_kib: 3\nglobal_buffer_kib: 64\n", "dram_bandwidth_bits_per_cycle"),  # missing
    ("preset: simba-v8\npes: -4\n", "pes"),  # negative
    ("preset: simba-v8\nvector_size: 0\n", "vector_size"),  # zero
    ("preset: simba-v8\nweight_buffer_kib: big\n", "weight_buffer_kib"),  # non-numeric
    ("preset: simba-v8\nlanes: 2.5\n", "lanes"),  # not an integer
    ("preset: simba-v8\nvector_width: 8\n", "vector_width"),  # unknown
    ("preset: simba-v8\nmac_pj: -0.1\n", "mac_pj"),
    ("preset: simba-v8\npe_dim: diagonal\n", "pe_dim"),
    ("preset: simba-v8\nmapping_objective: speed\n", "mapping_objective"),
    ("preset: simba-v8\nactivations_on_chip: maybe\n", "activations_on_chip"),
    ("preset: simba-v99\n", "preset"),
])
def test_yaml_errors_name_the_field_and_the_file(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(DynavitError) as err:
        Arch.from_yaml(path)
    assert field in str(err.value) and str(path) in str(err.value)


def test_with_validates_and_rejects_unknown_fields(v16):
    with pytest.raises(DynavitError, match="'lanes'"):
        v16.with_(lanes=0)
    with pytest.raises(DynavitError, match="'lane'"):
        v16.with_(lane=4)


def test_zigzag_yaml_is_accepted_by_zigzag(tmp_path, v16):
    from zigzag.stages.parser.accelerator_parser import AcceleratorParserStage

    acc = AcceleratorParserStage.parse_accelerator(str(v16.to_zigzag_yaml(tmp_path / "hw.yaml")))
    assert acc.operational_array.total_unit_count == v16.peak_macs_per_cycle
    names = {m.name for m in acc.memory_hierarchy.mem_level_list}
    assert {"weight_buffer", "input_buffer", "accum_buffer", "global_buffer", "dram"} <= names
    v16.to_zigzag_mapping_yaml(tmp_path / "map.yaml")
    from zigzag.stages.parser.workload_parser import WorkloadParserStage

    assert WorkloadParserStage.parse_mapping_data(str(tmp_path / "map.yaml"))


# --- the spatial mapping --------------------------------------------------------------------
def test_spatial_mapping_puts_c_on_the_vector_and_k_on_the_lanes(v16):
    sm = spatial_mapping(PROJ, v16)
    assert sm["D1"] == [("C", 16)] and sm["D2"] == [("K", 4)]
    assert sm["D3"][0][0] in ("K", "D")
    # a 3-channel patch embedding folds its kernel width into the vector
    assert spatial_mapping(PATCH, v16)["D1"] == [("C", 3), ("FX", 4)]
    assert spatial_mapping(PROJ, v16.with_(pe_dim="rows"))["D3"] == [("D", 16)]
    assert spatial_mapping(PROJ, v16.with_(pe_dim="K"))["D3"] == [("K", 16)]


def test_workload_layers_follow_zigzag_onnx_conventions():
    conv = workload_layer(PATCH)
    assert conv["equation"].startswith("O[b][g][k][oy][ox]") and conv["pr_loop_sizes"] == [224, 224]
    assert workload_layer(PROJ)["equation"] == "O[d][k]+=I[d][c]*W[c][k]"
    att = workload_layer(QK)
    assert dict(zip(att["loop_dims"], att["loop_sizes"], strict=True)) == {"C": 64, "D": 197, "K": 197, "H": 3}
    assert att["operand_source"]["W"] != att["id"]  # the second operand is not a constant


# --- costs ----------------------------------------------------------------------------------
def _sane(c: LayerCost, op: MacOp, arch: Arch) -> None:
    assert c.macs == op.macs
    assert c.energy_mac_pj == pytest.approx(op.macs * arch.mac_pj)
    assert c.energy_pj >= op.macs * arch.mac_pj
    assert c.energy_pj == pytest.approx(c.energy_mac_pj + c.energy_buffers_pj + c.energy_dram_pj)
    assert sum(c.energy_by_memory_pj.values()) == pytest.approx(c.energy_buffers_pj + c.energy_dram_pj)
    assert c.cycles >= op.macs / arch.peak_macs_per_cycle == pytest.approx(c.ideal_cycles)
    assert 0 < c.utilization <= 1


@pytest.mark.parametrize("op", [QKV, QK, AV, PATCH], ids=["linear", "qk", "av", "patch"])
def test_costs_are_physically_sane(v16, op):
    _sane(cost_mac_op(op, v16), op, v16)


def test_depthwise_and_grouped_convolutions(v16):
    dw = MacOp("conv", B=1, K=1, C=1, OY=28, OX=28, FY=3, FX=3, G=64)
    grouped = MacOp("conv", B=1, K=16, C=16, OY=14, OX=14, FY=3, FX=3, G=4)
    for op in (dw, grouped):
        _sane(cost_mac_op(op, v16), op, v16)
    assert spatial_mapping(dw, v16)["D2"][0][0] == "G"  # depthwise channels go on the lanes


def test_fewer_macs_never_cost_more(v16):
    for big, small in [(QKV, PROJ), (PROJ, MacOp("linear", B=197, K=96, C=192)),
                       (MacOp("linear", B=197, K=768, C=192), MacOp("linear", B=197, K=384, C=192)),
                       (QK, MacOp("attention", B=197, K=197, C=64, G=2))]:
        cb, cs = cost_mac_op(big, v16), cost_mac_op(small, v16)
        assert cs.energy_pj <= cb.energy_pj and cs.cycles <= cb.cycles, (big, small)


def test_cost_round_trips_through_json(v16):
    import json

    c = cost_mac_op(PROJ, v16)
    assert LayerCost.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert cost_mac_op(PROJ, v16).energy_pj == c.energy_pj  # deterministic


def test_activations_on_chip_skip_dram_when_they_fit(v16):
    off = cost_mac_op(QK, v16.with_(activations_on_chip=False))
    on = cost_mac_op(QK, v16.with_(activations_on_chip=True, global_buffer_kib=512))
    assert on.energy_dram_pj == 0 < off.energy_dram_pj
    assert "on-chip" in on.spatial_mapping


def test_an_unmappable_layer_names_the_layer_and_the_design(v16):
    tiny = v16.with_(weight_buffer_kib=0.001, name="tiny-weights")
    with pytest.raises(DynavitError, match=r"linear B197 K192 C192.*tiny-weights"):
        cost_mac_op(PROJ, tiny)
    with pytest.raises(DynavitError, match="search"):
        cost_mac_op(PROJ, v16, search="exhaustive")


# --- ZigZag's own example through the bridge -------------------------------------------------
def test_onnx_layers_become_macops():
    ops = mac_ops_from_onnx(RESNET18)
    assert len(ops) == 21  # 20 convolutions and the classifier (ZigZag's ResNet-18 layers)
    name, first, hw = ops[0]
    assert first == MacOp("conv", B=1, K=64, C=3, OY=112, OX=112, FY=7, FX=7, SY=2, SX=2) and hw == (224, 224)
    assert ops[-1][1] == MacOp("linear", B=1, K=1000, C=512)


def test_bridge_layers_equal_zigzags_own_onnx_layers():
    """A few ResNet-18 layers: MacOp -> bridge vs. ZigZag's ONNX parser -> the same pipeline."""
    from zigzag.parser.onnx.onnx_model_parser import ONNXModelParser
    from zigzag.stages.parser.accelerator_parser import AcceleratorParserStage

    from dynavit.accel import zigzag as bridge

    workload = ONNXModelParser(str(RESNET18), str(TPU_MAP)).run()
    theirs = {n.name: n for n in workload.node_list if hasattr(n, "layer_dim_sizes")}
    accelerator = AcceleratorParserStage.parse_accelerator(str(TPU_HW))
    design = ZigzagDesign(str(TPU_HW), str(TPU_MAP))
    picked = [la for la in mac_ops_from_onnx(RESNET18) if "downsample" in la[0] or la[0] == "/fc/Gemm"][:3]
    assert len(picked) == 3
    for name, op, hw in picked:
        ours = cost_mac_op(op, design, search="fast", input_hw=hw)
        ref = bridge._run_zigzag_layer(theirs[name], accelerator, bridge.SEARCH_LPF_LIMIT["fast"], "latency")
        assert (ours.energy_pj, ours.cycles) == (ref.energy_total, ref.latency_total2), name


def test_reproduction_matches_zigzags_api_on_a_small_network(tmp_path):
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 8, 3, 3], [0.0] * (16 * 8 * 9))
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [32, 256], [0.0] * (32 * 256))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Flatten", ["y"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["z"], transB=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32])], [w, fc])
    path = tmp_path / "tiny.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(onnx.shape_inference.infer_shapes(model), path)  # ZigZag's parser wants inferred shapes
    r = reproduce_zigzag_example(path, TPU_HW, TPU_MAP, search="fast")
    assert len(r["layers"]) == 2
    assert r["bridge_energy_pj"] == pytest.approx(r["zigzag_energy_pj"], rel=1e-12)
    assert r["bridge_cycles"] == r["zigzag_cycles"]


@pytest.mark.slow
def test_resnet18_on_tpu_like_reproduces_zigzags_published_result():
    """ZigZag's tests/main/test_origin/test_tpu_like.py expects these totals for this network."""
    r = reproduce_zigzag_example(RESNET18, TPU_HW, TPU_MAP, search="full")
    assert r["bridge_energy_pj"] == pytest.approx(r["zigzag_energy_pj"], rel=1e-12)
    assert r["bridge_cycles"] == r["zigzag_cycles"]
    assert r["bridge_energy_pj"] == pytest.approx(1871436380.656)
    assert r["bridge_cycles"] == pytest.approx(3865041.0)
    assert all(math.isclose(la["energy_pj"], la["zigzag_energy_pj"]) for la in r["layers"])

