"""The bridge to ZigZag: cost one ``MacOp`` on one design with ZigZag's mapping search.

How a ``MacOp`` becomes a ZigZag layer and which spatial mapping it gets on an ``Arch`` is
``dynavit.accel.zigzag_layer``'s (re-exported here); this module runs ZigZag on it.
``dynavit.accel.zigzag_onnx`` checks the bridge against ZigZag's own whole-network API.

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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dynavit.accel.arch import OBJECTIVES, Arch
from dynavit.accel.layers import MacOp
from dynavit.accel.zigzag_layer import (
    SpatialMapping,
    describe,
    spatial_mapping,
    spatial_mapping_candidates,
    workload_layer,
)
from dynavit.errors import DynavitError

SEARCH_LPF_LIMIT = {"fast": 5, "full": 6}
_LINKS = {"O": "O", "W": "I2", "I": "I1"}


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
def quiet_zigzag() -> Iterator[None]:
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

    with quiet_zigzag():
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
    with quiet_zigzag():
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

    with quiet_zigzag():
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
    with quiet_zigzag():
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


__all__ = ["SEARCH_LPF_LIMIT", "Design", "LayerCost", "SpatialMapping", "ZigzagDesign", "cost_mac_op", "describe",
           "on_chip_operands", "quiet_zigzag", "spatial_mapping", "spatial_mapping_candidates", "workload_layer"]
