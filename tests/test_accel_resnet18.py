"""ZigZag's own ResNet-18 example through dynavit's bridge: the totals ZigZag's test publishes.

``benchmarks/accel_resnet18.py reproduce`` also runs ZigZag's whole-network API beside the bridge
(``tests/test_accel_zigzag.py`` checks the two agree layer by layer, marked slow); here the bridge
alone must land on the numbers of ZigZag's ``tests/main/test_origin/test_tpu_like.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import require

require("zigzag")  # the accel extra, part of the dev install: CI fails rather than skips
require("onnx")

from dynavit.accel.zigzag_onnx import mac_ops_from_onnx, reproduce_zigzag_example  # noqa: E402

ZIGZAG = Path(__import__("zigzag").__file__).parent
RESNET18 = ZIGZAG / "inputs/workload/resnet18.onnx"
TPU_HW, TPU_MAP = ZIGZAG / "inputs/hardware/tpu_like.yaml", ZIGZAG / "inputs/mapping/tpu_like.yaml"
EXPECTED_PJ, EXPECTED_CYCLES = 1871436380.6559997, 3865041.0  # ZigZag's test_tpu_like.py, resnet18.onnx


def test_resnet18_has_zigzags_21_conv_and_gemm_layers() -> None:
    ops = mac_ops_from_onnx(RESNET18)
    assert len(ops) == 21
    kinds = [op.kind for _, op, _ in ops]
    assert kinds.count("conv") == 20 and kinds[-1] == "linear"  # 17 3x3/7x7 + 3 downsampling convs, 1 FC
    assert sum(op.macs for _, op, _ in ops) == pytest.approx(1.814e9, rel=1e-3)  # ResNet-18's 1.8 GMAC


@pytest.mark.slow  # 21 full mapping searches: 47 s on 2 idle cores, 6.4 min on a loaded shared machine
def test_bridge_reproduces_zigzags_published_resnet18_totals() -> None:
    r = reproduce_zigzag_example(RESNET18, TPU_HW, TPU_MAP, search="full", compare=False)
    assert len(r["layers"]) == 21
    assert r["bridge_energy_pj"] == pytest.approx(EXPECTED_PJ, rel=1e-12)
    assert r["bridge_cycles"] == EXPECTED_CYCLES
    assert math.fsum(la["energy_pj"] for la in r["layers"]) == r["bridge_energy_pj"]
    assert all(la["energy_pj"] > 0 and la["cycles"] > 0 for la in r["layers"])
