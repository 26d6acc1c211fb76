"""ZigZag's own example, layer by layer through the bridge, and against ``zigzag.api``.

Why: the bridge (``dynavit.accel.zigzag``) must cost a layer exactly as ZigZag does. Costing an
ONNX network layer by layer through it and comparing with ZigZag's whole-network call checks
that (``benchmarks/accel_resnet18.py`` runs it on ZigZag's ResNet-18). ``onnx`` and ``zigzag``
are the ``accel`` extra, imported when a function needs them.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from dynavit.accel.layers import MacOp
from dynavit.accel.zigzag import SEARCH_LPF_LIMIT, ZigzagDesign, cost_mac_op, quiet_zigzag
from dynavit.accel.zigzag_layer import describe
from dynavit.errors import DynavitError


def mac_ops_from_onnx(path: str | Path) -> list[tuple[str, MacOp, tuple[int, int] | None]]:
    """The layers ZigZag costs in an ONNX model (Conv, Gemm, MatMul) as (node name, MacOp, input_hw).

    ZigZag costs only these node types; every other node (ReLU, pooling, Add, ...) is a
    zero-cost dummy in its ONNX workload. Shapes come from ONNX shape inference.
    """
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    consts = {t.name: list(t.dims) for t in model.graph.initializer}  # dims only: data may be external
    shapes.update(consts)

    def attr(node: Any, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    out: list[tuple[str, MacOp, tuple[int, int] | None]] = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"Op{i}"
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not x or not y:
            raise DynavitError(f"{path}: shape inference gave no shape for node {name}")
        if node.op_type == "Conv":
            g = int(attr(node, "group", 1))
            (fy, fx), (sy, sx) = attr(node, "kernel_shape", None), attr(node, "strides", [1, 1])
            if any(d != 1 for d in attr(node, "dilations", [1, 1])):
                raise DynavitError(f"{path}: node {name} is dilated, which a MacOp cannot express")
            op = MacOp("conv", B=max(y[0], 1), K=math.ceil(y[1] / g), C=math.ceil(x[1] / g), OY=y[2], OX=y[3],
                       FY=fy, FX=fx, SY=sy, SX=sx, G=g)
            out.append((name, op, (x[2], x[3])))
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            x = x[::-1]
        rows = math.prod(x[:-1]) if node.input[1] in consts else x[-2]
        batch = 1 if node.input[1] in consts else math.prod(x[:-2])
        kind = "linear" if node.input[1] in consts else "attention"
        out.append((name, MacOp(kind, B=max(rows, 1), K=y[-1], C=x[-1], G=max(batch, 1)), None))
    return out


def reproduce_zigzag_example(workload_onnx: str | Path, hardware_yaml: str | Path, mapping_yaml: str | Path, *,
                             search: str = "full", compare: bool = True) -> dict[str, Any]:
    """Cost an ONNX model layer by layer through the bridge and (``compare``) against ``zigzag.api``.

    Apples to apples: ZigZag's whole-network call runs the same per-layer pipeline and sums
    the layers (no inter-layer data locality unless asked for), so the bridge's per-layer
    sum must equal it. Returns the per-layer and total numbers of both.
    """
    design = ZigzagDesign(str(hardware_yaml), str(mapping_yaml))
    layers = []
    for name, op, input_hw in mac_ops_from_onnx(workload_onnx):
        c = cost_mac_op(op, design, search=search, input_hw=input_hw)
        layers.append({"name": name, "shape": describe(op), "energy_pj": c.energy_pj, "cycles": c.cycles,
                       "seconds": c.seconds})
    result: dict[str, Any] = {
        "workload": str(workload_onnx), "hardware": design.hardware, "mapping": design.mapping, "search": search,
        "layers": layers, "bridge_energy_pj": math.fsum(la["energy_pj"] for la in layers),
        "bridge_cycles": math.fsum(la["cycles"] for la in layers),
        "bridge_seconds": sum(la["seconds"] for la in layers)}
    if compare:
        result.update(_zigzag_api_totals(str(workload_onnx), design, SEARCH_LPF_LIMIT[search]))
        by_name = {n: e for n, e in result.pop("zigzag_layers")}
        for la in layers:
            la["zigzag_energy_pj"], la["zigzag_cycles"] = by_name.get(la["name"], (math.nan, math.nan))
    return result


def _zigzag_api_totals(workload: str, design: ZigzagDesign, lpf_limit: int) -> dict[str, Any]:
    from zigzag.api import get_hardware_performance_zigzag

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # the API calls logging.basicConfig(INFO)
    t0 = time.perf_counter()
    try:
        with quiet_zigzag(), tempfile.TemporaryDirectory(prefix="dynavit-zigzag-") as tmp:
            energy, latency, cmes = get_hardware_performance_zigzag(
                workload, design.hardware, design.mapping, lpf_limit=lpf_limit, dump_folder=tmp,
                loma_show_progress_bar=False, opt={"edp": "EDP"}.get(design.mapping_objective,
                                                                     design.mapping_objective))
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    per_layer = [(layer.name, (float(cme.energy_total), float(cme.latency_total2)))
                 for cme, (layer, _) in cmes[0][1]]
    return {"zigzag_energy_pj": float(energy), "zigzag_cycles": float(latency),
            "zigzag_seconds": time.perf_counter() - t0, "zigzag_layers": per_layer}


__all__ = ["mac_ops_from_onnx", "reproduce_zigzag_example"]
