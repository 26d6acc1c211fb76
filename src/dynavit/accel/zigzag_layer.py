"""A ``MacOp`` as a ZigZag layer, and its fixed spatial mapping on an ``Arch``.

How a ``MacOp`` becomes a ZigZag layer (``workload_layer``): exactly as ZigZag's own ONNX
parser writes Conv and Gemm/MatMul nodes (same equations, loop-dimension names and order,
precisions), so a layer costed by the bridge (``dynavit.accel.zigzag``) and the same layer
parsed from ONNX by ZigZag give the same numbers (``reproduce_zigzag_example`` checks this on
ResNet-18):

- ``conv``: ``O[b][g][k][oy][ox] += W[g][k][c][fy][fx] * I[b][g][c][iy][ix]``;
- ``linear``: ``O[d][k] += I[d][c] * W[c][k]``, ``D`` = the rows (``B x OY x OX``), with an
  ``[h]`` index on all three operands when ``G > 1`` (grouped linear);
- ``attention``: ``O[h][d][k] += I[h][d][c] * W[h][c][k]``, ``H = G`` (batch x heads). The
  second operand is an activation (K^T for QK^T, V for AV); it takes ZigZag's ``W`` operand,
  i.e. the array's weight path (weight registers and buffers), and, like every operand of a
  ZigZag layer, it starts in DRAM. ZigZag is told it is not a constant.

Plain data only (no ZigZag import): the spatial mapping is chosen here, per layer, so the
bridge's search is ZigZag's temporal search alone.
"""

from __future__ import annotations

import math
from typing import Any

from dynavit.accel.arch import Arch
from dynavit.accel.layers import MacOp
from dynavit.errors import DynavitError

SpatialMapping = dict[str, list[tuple[str, int]]]  # array dim -> [(ZigZag loop dim, unrolling)]
_LAYER_ID, _PRODUCER_ID = 1, 0  # operand_source: an id != the layer's marks an operand as not constant


def workload_layer(op: MacOp, *, input_hw: tuple[int, int] | None = None, intermediate_bits: int | None = None,
                   name: str | None = None) -> dict[str, Any]:
    """The ZigZag layer (user-format dict) of ``op``, as ZigZag's ONNX parser would write it.

    ``input_hw`` is a convolution's real input height and width when zero padding makes it
    smaller than ``SY*(OY-1)+FY`` (ZigZag then counts fewer input reads; ONNX gives it).
    ``intermediate_bits`` is the precision of partial sums (default ``2 x op.bits``, ZigZag's
    ONNX default).
    """
    psum = intermediate_bits or 2 * op.bits
    d: dict[str, Any] = {
        "id": _LAYER_ID,
        "name": name or describe(op),
        "operand_precision": {"W": op.bits, "I": op.bits, "O": psum, "O_final": op.bits},
        "operand_source": {"W": _PRODUCER_ID if op.kind == "attention" else _LAYER_ID, "I": _PRODUCER_ID},
        "dimension_relations": [],
    }
    if op.kind == "conv":
        iy, ix = input_hw or op.input_hw
        d.update(operator_type="Conv", equation="O[b][g][k][oy][ox]+=W[g][k][c][fy][fx]*I[b][g][c][iy][ix]",
                 loop_dims=["B", "K", "G", "OX", "OY", "C", "FX", "FY"],
                 loop_sizes=[op.B, op.K, op.G, op.OX, op.OY, op.C, op.FX, op.FY],
                 dimension_relations=[f"ix={op.SX}*ox+1*fx", f"iy={op.SY}*oy+1*fy"],
                 pr_loop_dims=["IX", "IY"], pr_loop_sizes=[ix, iy], padding=[[0, 0], [0, 0]])
        return d
    if op.FY != 1 or op.FX != 1:
        raise DynavitError(f"{describe(op)}: a {op.kind} layer has no kernel window (FY = FX = 1)")
    rows = op.B * op.OY * op.OX
    if op.kind == "linear" and op.G == 1:
        d.update(operator_type="Gemm", equation="O[d][k]+=I[d][c]*W[c][k]", loop_dims=["C", "D", "K"],
                 loop_sizes=[op.C, rows, op.K])
    else:
        d.update(operator_type="MatMul" if op.kind == "attention" else "Gemm",
                 equation="O[h][d][k]+=I[h][d][c]*W[h][c][k]", loop_dims=["C", "D", "K", "H"],
                 loop_sizes=[op.C, rows, op.K, op.G])
    return d


def describe(op: MacOp) -> str:
    """A short, unique name of a layer shape (for messages and ZigZag's layer name)."""
    s = f"{op.kind} B{op.B} K{op.K} C{op.C}"
    if op.kind == "conv":
        s += f" O{op.OY}x{op.OX} F{op.FY}x{op.FX} S{op.SY}x{op.SX}"
    elif op.OY * op.OX > 1:
        s += f" O{op.OY}x{op.OX}"
    return s + (f" G{op.G}" if op.G > 1 else "") + f" {op.bits}b"


# --- the fixed spatial mapping on an Arch -------------------------------------------------
def spatial_mapping(op: MacOp, arch: Arch) -> SpatialMapping:
    """How ``op`` is spread over the array of ``arch``: {array dim: [(ZigZag loop dim, factor)]}.

    - D1, the vector (V): the dot-product (reduction) dims. C first; a convolution with
      ``C < V`` also folds its kernel width and then height into the vector (an im2col
      dot product), so a 3-channel patch embedding does not run at 3/V.
    - D2, the lanes (L): output channels K (the lanes share the broadcast input vector);
      a depthwise layer (``K = 1``, ``G > 1``) puts its groups there instead.
    - D3, the PEs (P): the remaining output channels (Simba-style weight partitioning; each PE
      holds its own slice of weights) or the rows (tokens, output pixels) or groups (heads),
      whichever keeps more PEs busy; ties go to K. ``arch.pe_dim`` forces K or rows.

    Factors take the fewest passes with the fewest idle units (197 over 16 lanes: 16, 13
    passes). This is the first of ``spatial_mapping_candidates``.
    """
    return spatial_mapping_candidates(op, arch)[0]


def spatial_mapping_candidates(op: MacOp, arch: Arch) -> list[SpatialMapping]:
    """``spatial_mapping``'s choice first, then the other PE splits by decreasing utilisation.

    Why alternatives: ZigZag's memory allocator fills buffers greedily from the bottom and
    does not backtrack, so a split can be unmappable although another fits (e.g. AV of
    DeiT-tiny on simba-v8 with rows across PEs: each PE's input buffer takes all its rows,
    and the global buffer, which serves all PEs, then cannot hold them all).
    """
    dims = _loop_sizes(op)
    d1: list[tuple[str, int]] = []
    room = arch.vector_size
    for dim in ("C", "FX", "FY") if op.kind == "conv" else ("C",):
        size = dims.get(dim, 1)
        if size > 1 and room > 1:
            f = _factor(size, room)
            d1.append((dim, f))
            room //= f
    d1 = d1 or [("C", 1)]
    lane_dim = "G" if op.kind == "conv" and op.K == 1 and op.G > 1 else "K"
    d2 = [(lane_dim, _factor(dims[lane_dim], arch.lanes))]
    left = {d: math.ceil(s / dict(d1 + d2).get(d, 1)) for d, s in dims.items() if s > 1}
    groups = {"K": ["K"], "rows": ["D", "OX", "OY", "B", "H", "G"]}
    preferred = groups["K"] + groups["rows"] if arch.pe_dim == "auto" else groups[arch.pe_dim]
    others = [d for d in groups["K"] + groups["rows"] if d not in preferred]
    scored: list[tuple[int, float, int, tuple[str, int]]] = []
    for rank, dim in enumerate(preferred + others):
        n = left.get(dim, 1)
        if n > 1:
            f = _factor(n, arch.pes)
            scored.append((dim not in preferred, -n / (arch.pes * math.ceil(n / f)), rank, (dim, f)))
    d3s = [[entry] for *_, entry in sorted(scored)] + [[(d2[0][0], 1)]]  # last resort: idle PEs
    return [{"D1": d1, "D2": d2, "D3": d3} for d3 in d3s]


def _factor(size: int, room: int) -> int:
    """The smallest unrolling of ``size`` over at most ``room`` units that takes the fewest passes."""
    return math.ceil(size / math.ceil(size / room))


def _loop_sizes(op: MacOp) -> dict[str, int]:
    layer = workload_layer(op)
    return dict(zip(layer["loop_dims"], layer["loop_sizes"], strict=True))


__all__ = ["SpatialMapping", "describe", "spatial_mapping", "spatial_mapping_candidates", "workload_layer"]
