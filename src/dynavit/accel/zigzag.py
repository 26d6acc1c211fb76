"""The bridge to ZigZag: cost one ``MacOp`` on one design with ZigZag's mapping search.

How a ``MacOp`` becomes a ZigZag layer (``workload_layer``): exactly as ZigZag's own ONNX
parser writes Conv and Gemm/MatMul nodes (same equations, loop-dimension names and order,
precisions), so a layer costed here and the same layer parsed from ONNX by ZigZag give the
same numbers (``reproduce_zigzag_example`` checks this on ResNet-18):

- ``conv``: ``O[b][g][k][oy][ox] += W[g][k][c][fy][fx] * I[b][g][c][iy][ix]``;
- ``linear``: ``O[d][k] += I[d][c] * W[c][k]``, ``D`` = the rows (``B x OY x OX``), with an
  ``[h]`` index on all three operands when ``G > 1`` (grouped linear);
- ``attention``: ``O[h][d][k] += I[h][d][c] * W[h][c][k]``, ``H = G`` (batch x heads). The
  second operand is an activation (K^T for QK^T, V for AV); it takes ZigZag's ``W`` operand,
  i.e. the array's weight path (weight registers and buffers), and, like every operand of a
  ZigZag layer, it starts in DRAM. ZigZag is told it is not a constant.

Every ZigZag layer starts with its operands in, and ends with its output written to, the top
of each operand's memory hierarchy (DRAM): ZigZag costs layers one by one.

A design is an ``Arch`` (``dynavit.accel.arch``; the bridge fixes the spatial mapping per
layer, see ``spatial_mapping``) or a ``ZigzagDesign`` (any ZigZag hardware + mapping YAML,
used as ZigZag would use it).

Search (``search=``): the spatial mapping is fixed (one per layer), so the cost is ZigZag's
LOMA temporal search, which enumerates orderings of the temporal loops' prime factors and
evaluates the cost model (~10 ms) for each. ``lpf_limit`` caps the number of factors (ZigZag
merges the smallest ones of the dimension with the most), bounding the orderings at
``lpf_limit!``: ``"full"`` is ZigZag's default, 6 (720 orderings); ``"fast"`` uses 5 (120). A
loop needs at least one factor, so layers with more loop dimensions search more. Fewer
factors also means coarser tiles, which is why "fast" can miss the best mapping; how often
and by how much is measured by ``benchmarks/accel_resnet18.py search``. The best mapping
is the one minimising the design's ``mapping_objective`` (``Arch``: EDP by default;
``ZigzagDesign``: latency, ZigZag's default).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dynavit.accel.arch import OBJECTIVES, Arch
from dynavit.accel.layers import MacOp
from dynavit.errors import DynavitError

SEARCH_LPF_LIMIT = {"fast": 5, "full": 6}
_LINKS = {"O": "O", "W": "I2", "I": "I1"}
SpatialMapping = dict[str, list[tuple[str, int]]]  # array dim -> [(ZigZag loop dim, unrolling)]
_LAYER_ID, _PRODUCER_ID = 1, 0  # operand_source: an id != the layer's marks an operand as not constant


@dataclass(frozen=True)
class ZigzagDesign:
    """A design given as ZigZag's own hardware and mapping YAML files."""

    hardware: str
    mapping: str
    name: str = ""
    mapping_objective: str = "latency"  # zigzag.api's default criterion

    def __post_init__(self) -> None:
        if self.mapping_objective not in OBJECTIVES:
            raise DynavitError(f"mapping_objective must be one of {', '.join(OBJECTIVES)}, "
                               f"not {self.mapping_objective!r}")
        for what in ("hardware", "mapping"):
            p = Path(getattr(self, what))
            if not p.is_file():
                raise DynavitError(f"ZigZag {what} file {p} does not exist")
            object.__setattr__(self, what, str(p.resolve()))
        if not self.name:
            object.__setattr__(self, "name", Path(self.hardware).stem)

    def key(self) -> str:
        """Hash of both files' contents (a cache key)."""
        h = hashlib.sha256(self.mapping_objective.encode())
        for p in (self.hardware, self.mapping):
            h.update(Path(p).read_bytes())
        return h.hexdigest()[:20]


Design = Arch | ZigzagDesign


@dataclass(frozen=True)
class LayerCost:
    """ZigZag's best mapping of one layer on one design. Energies in pJ, time in cycles."""

    macs: int
    cycles: float  # ZigZag's latency_total2: computation + stalls + on/off-loading
    ideal_cycles: float  # macs / peak MACs per cycle
    utilization: float  # ideal_cycles / cycles
    energy_pj: float
    energy_mac_pj: float
    energy_buffers_pj: float  # every on-chip memory (registers included)
    energy_dram_pj: float
    energy_by_memory_pj: dict[str, float] = field(default_factory=dict)
    spatial_utilization: float = 0.0  # the fraction of MACs the spatial mapping keeps busy
    spatial_mapping: str = ""
    search: str = ""
    seconds: float = 0.0  # wall time of the search (not part of the result's meaning)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerCost:
        """From ``to_dict``'s output; keys this version does not know (a newer cache) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --- MacOp -> ZigZag layer ----------------------------------------------------------------
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


def _mapping_data(sm: SpatialMapping) -> list[dict[str, Any]]:
    from zigzag.parser.mapping_validator import MappingValidator

    raw = [{"name": "default", "memory_operand_links": dict(_LINKS),
            "spatial_mapping": {oa: [f"{d}, {f}" for d, f in entries] for oa, entries in sm.items()}}]
    validator = MappingValidator(raw)
    data = validator.normalized_data
    if not validator.validate():
        raise DynavitError(f"internal error: invalid ZigZag mapping {raw}")
    return data


# --- ZigZag objects, built once per process ------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ZigZag's loggers (it logs every mapping at INFO and failures at CRITICAL)."""
    log = logging.getLogger("zigzag")
    level, propagate = log.level, log.propagate
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)
        log.propagate = propagate


def _accelerator_from_data(data: dict[str, Any], where: str) -> Any:
    from zigzag.parser.accelerator_factory import AcceleratorFactory
    from zigzag.parser.accelerator_validator import AcceleratorValidator

    with _quiet():
        validator = AcceleratorValidator(data)
        normalized = validator.normalized_data
        if not validator.validate():
            raise DynavitError(f"{where}: ZigZag rejects the design: {validator.validator.errors or 'see its rules'}")
        return AcceleratorFactory(normalized).create()


@functools.lru_cache(maxsize=64)
def _arch_accelerator(arch: Arch, on_chip: tuple[str, ...] = ()) -> Any:
    return _accelerator_from_data(arch.to_zigzag(on_chip), f"design {arch.name}")


def on_chip_operands(op: MacOp, arch: Arch) -> tuple[str, ...]:
    """The operands that stay in the global buffer for ``op`` (``Arch.activations_on_chip``).

    Activations (input and output; for attention also the second operand) stay on chip when
    the whole tensors fit in the global buffer together; weights always come from DRAM.
    """
    if not arch.activations_on_chip:
        return ()
    room = arch.global_buffer_kib * 1024 * 8
    io = (op.input_elems + op.output_elems) * op.bits
    if op.kind == "attention" and io + op.weight_elems * op.bits <= room:
        return ("I1", "I2", "O")
    return ("I1", "O") if io <= room else ()


@functools.lru_cache(maxsize=16)
def _external(hardware: str, mapping: str, stamp: tuple[float, float]) -> tuple[Any, list[dict[str, Any]]]:
    from zigzag.stages.parser.workload_parser import WorkloadParserStage
    from zigzag.utils import open_yaml

    accelerator = _accelerator_from_data(open_yaml(hardware), hardware)
    with _quiet():
        try:
            mapping_data = WorkloadParserStage.parse_mapping_data(mapping)
        except ValueError as err:
            raise DynavitError(f"{mapping}: ZigZag rejects the mapping: {err}") from None
    return accelerator, mapping_data


def _target(op: MacOp, design: Design, on_chip: tuple[str, ...] = (), sm: SpatialMapping | None = None
            ) -> tuple[Any, list[dict[str, Any]], int | None, int, str]:
    """(ZigZag accelerator, mapping data, partial-sum bits, peak MACs/cycle, spatial mapping text)."""
    if isinstance(design, Arch):
        sm = sm or spatial_mapping(op, design)
        text = " ".join(f"{oa}:" + ",".join(f"{d}{f}" for d, f in e) for oa, e in sm.items())
        if on_chip:
            text += " on-chip:" + ",".join(on_chip)
        return (_arch_accelerator(design, on_chip), _mapping_data(sm), design.accum_bits,
                design.peak_macs_per_cycle, text)
    if isinstance(design, ZigzagDesign):
        stamp = (Path(design.hardware).stat().st_mtime, Path(design.mapping).stat().st_mtime)
        acc, mapping = _external(design.hardware, design.mapping, stamp)
        return acc, mapping, None, math.prod(acc.operational_array.dimension_sizes.values()), ""
    raise TypeError(f"a design is an Arch or a ZigzagDesign, not {type(design).__name__}")


# --- costing --------------------------------------------------------------------------------
def cost_mac_op(op: MacOp, arch: Design, *, search: str = "fast",
                input_hw: tuple[int, int] | None = None) -> LayerCost:
    """Cost ``op`` on ``arch`` with ZigZag (best temporal mapping by latency, then energy).

    Raises ``DynavitError`` naming the layer and the design when ZigZag finds no valid mapping
    (e.g. a tile that fits no buffer). Safe in worker processes: no files, no shared state
    beyond per-process caches of parsed designs.
    """
    if search not in SEARCH_LPF_LIMIT:
        raise DynavitError(f"search must be one of {', '.join(SEARCH_LPF_LIMIT)}, not {search!r}")
    if isinstance(arch, Arch) and op.bits > arch.data_bits:
        raise DynavitError(f"layer [{describe(op)}] has {op.bits}-bit operands; design {arch.name} has a "
                           f"{arch.data_bits}-bit datapath")
    t0 = time.perf_counter()
    lpf = SEARCH_LPF_LIMIT[search]
    if isinstance(arch, Arch):
        # on chip if ZigZag can map it so, else from DRAM; the preferred split first, and if the pruned
        # search finds no mapping for it, the full search (a coarser loop split can be what does not fit)
        # before the other splits
        on_chip = on_chip_operands(op, arch)
        attempts = [(oc, sm, limit) for oc in dict.fromkeys([on_chip, ()])
                    for i, sm in enumerate(spatial_mapping_candidates(op, arch))
                    for limit in dict.fromkeys([lpf, SEARCH_LPF_LIMIT["full"]] if i == 0 else [lpf])]
    else:
        attempts = [((), None, lpf)]
    first_error: Exception | None = None
    for on_chip, sm, limit in attempts:
        accelerator, mapping, psum_bits, peak, sm_text = _target(op, arch, on_chip, sm)
        layer_dict = workload_layer(op, input_hw=input_hw, intermediate_bits=psum_bits)
        try:
            cme = _run_layer(layer_dict, mapping, accelerator, limit, arch.mapping_objective)
        except Exception as err:  # ZigZag signals an unmappable layer with assertions and its own exceptions
            first_error = first_error or err
            continue
        return _layer_cost(op, cme, peak, search, sm_text, time.perf_counter() - t0,
                           external=not isinstance(arch, Arch))
    assert first_error is not None
    raise DynavitError(f"ZigZag cannot map layer [{describe(op)}] on design {arch.name}: {_reason(first_error)}"
                       ) from first_error


def _reason(err: Exception) -> str:
    text = str(err).strip()
    if "No valid loop ordering" in text:
        return ("no temporal mapping fits its memories (a buffer cannot hold the tile the spatial mapping "
                "needs, or the layer does not fit the hierarchy)")
    return text.splitlines()[0] if text else type(err).__name__


def _run_layer(layer_dict: dict[str, Any], mapping: list[dict[str, Any]], accelerator: Any, lpf_limit: int,
               objective: str) -> Any:
    from zigzag.parser.workload_factory import LayerNodeFactory

    with _quiet():
        layer = LayerNodeFactory(layer_dict, mapping).create()
    return _run_zigzag_layer(layer, accelerator, lpf_limit, objective)


def _run_zigzag_layer(layer: Any, accelerator: Any, lpf_limit: int, objective: str) -> Any:
    """The per-layer part of ``zigzag.api.get_hardware_performance_zigzag``'s pipeline, same settings."""
    from zigzag.mapping.temporal_mapping import TemporalMappingType
    from zigzag.stages.evaluation.cost_model_evaluation import CostModelStage
    from zigzag.stages.main import MainStage
    from zigzag.stages.mapping.spatial_mapping_generation import SpatialMappingGeneratorStage
    from zigzag.stages.mapping.temporal_mapping_generator_stage import TemporalMappingGeneratorStage
    from zigzag.stages.results.reduce_stages import MinimalEDPStage, MinimalEnergyStage, MinimalLatencyStage

    best = {"edp": MinimalEDPStage, "energy": MinimalEnergyStage, "latency": MinimalLatencyStage}[objective]
    stages = [best, SpatialMappingGeneratorStage, best, TemporalMappingGeneratorStage, CostModelStage]
    with _quiet():
        (cme, _), *_ = MainStage(
            stages, layer=layer, accelerator=accelerator, loma_lpf_limit=lpf_limit, loma_show_progress_bar=False,
            nb_mappings_generated=3, enable_mix_spatial_mapping_generation=False,
            access_same_data_considered_as_no_access=True, temporal_mapping_type=TemporalMappingType.UNEVEN,
        ).run()
    return cme


def _off_chip(hierarchy: Any, external: bool) -> set[str]:
    """Names of the off-chip memories: "dram" on an Arch; on an external design the memories
    whose name says DRAM, else its top level."""
    names = {m.name for m in hierarchy.mem_level_list}
    dram = {n for n in names if "dram" in n.lower()}
    if external and not dram:
        dram = {m.name for m in hierarchy.get_top_memories()[0]}
    return dram


def _layer_cost(op: MacOp, cme: Any, peak: int, search: str, sm_text: str, seconds: float,
                external: bool) -> LayerCost:
    by_memory: dict[str, float] = {}
    hierarchy = cme.accelerator.memory_hierarchy
    for layer_op, per_level in cme.mem_energy_breakdown.items():
        mem_op = cme.layer.memory_operand_links.layer_to_mem_op(layer_op)
        for level, energy in zip(hierarchy.get_memory_levels(mem_op), per_level, strict=False):
            by_memory[level.name] = by_memory.get(level.name, 0.0) + float(energy)
    off_chip = _off_chip(hierarchy, external)
    dram = sum(e for n, e in by_memory.items() if n in off_chip)
    cycles = float(cme.latency_total2)
    ideal = op.macs / peak
    return LayerCost(
        macs=op.macs, cycles=cycles, ideal_cycles=ideal, utilization=ideal / cycles if cycles else 0.0,
        energy_pj=float(cme.energy_total), energy_mac_pj=float(cme.mac_energy),
        energy_buffers_pj=float(cme.mem_energy) - dram, energy_dram_pj=dram, energy_by_memory_pj=by_memory,
        spatial_utilization=float(cme.mac_spatial_utilization), spatial_mapping=sm_text, search=search,
        seconds=seconds)


# --- ZigZag's own example, layer by layer through the bridge --------------------------------
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
        with _quiet(), tempfile.TemporaryDirectory(prefix="dynavit-zigzag-") as tmp:
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


__all__ = ["SEARCH_LPF_LIMIT", "Design", "LayerCost", "ZigzagDesign", "cost_mac_op", "describe", "mac_ops_from_onnx",
           "on_chip_operands", "reproduce_zigzag_example", "spatial_mapping", "spatial_mapping_candidates",
           "workload_layer"]
