"""A parametrised MAGNet/Simba-like accelerator: a few numbers in, a ZigZag design out.

Why a template and not a hand-written ZigZag YAML: the paper sweeps vector size and memory
sizes of a MAGNet-generated accelerator, so a design must be a point in a small parameter
space that a design-space exploration can vary (``Arch.with_``) and a cache can key
(``Arch.key``). MAGNet itself (Venkatesan et al., ICCAD 2019) and its 5 nm energy numbers are
not public; this is the organisation its papers and Simba (Shao et al., MICRO 2019; a
MAGNet-generated chip) describe:

- a PE array of ``pes`` PEs (operational-array dimension D3);
- each PE has ``lanes`` vector MAC units (D2: the lanes compute different output channels K
  from the same broadcast input vector);
- each vector unit is a ``vector_size``-wide dot product (D1: the input channels C, reduced by
  an adder tree), so a PE does ``vector_size x lanes`` MACs per cycle;
- per PE a weight buffer, an input buffer and an accumulation buffer; one global buffer for
  activations (inputs and outputs) shared by all PEs; DRAM holds everything. Weights go from
  DRAM straight to the PE weight buffers, as in Simba, where the global buffer holds
  activations only;
- registers next to the MACs: one weight per MAC (weight-stationary "weight collector"), one
  input element per vector position (broadcast to the lanes) and one accumulator per lane.

Which loop dimension the PEs split (D3) is chosen per layer by the bridge
(``dynavit.accel.zigzag``): output channels K (Simba's weight-stationary partitioning, each
PE holds a disjoint slice of the weights) or the rows (tokens / output pixels) when those
keep more PEs busy; ``pe_dim`` forces one of the two.

Two choices that are the design's and not ZigZag's, so they are fields (and in ``key()``):

- ``mapping_objective``: what the mapper minimises per layer. Default ``edp``: ZigZag's own
  default, latency (ties broken by energy), happily re-reads every weight from the weight
  buffer at each MAC for a few percent fewer cycles (seen on DeiT-tiny's linears), a
  mapping an energy study should not assume;
- ``activations_on_chip``: ZigZag costs layers one at a time, each reading its operands from
  and writing its output to the top of the hierarchy (DRAM). With this set, a layer whose
  input and output activations fit in the global buffer together keeps them there (weights
  still stream from DRAM), as a layer-by-layer accelerator that keeps activations on chip
  would. Default on, consistent with the vector-unit model (``accel.vector``), which keeps an
  op's activations on chip under the same rule; off gives ZigZag's own semantics.

Presets (``PRESETS``): ``simba-v{8,16,32,64}``, 16 PEs x 64/V lanes x V = 1024 MACs/cycle with
Simba's per-PE buffers (``simba-v8`` is Simba's PE organisation), and ``simba-v16-bigmem``
with 4x the buffers. 1 GHz, 256 bits/cycle of DRAM bandwidth (32 GB/s), 2048 bits/cycle of
global-buffer bandwidth: assumptions, not published MAGNet numbers.

Energy defaults: ZigZag 3.9's example designs, not MAGNet's unpublished 5 nm numbers; every
number and its source is in ``dynavit.accel.energy`` (``ENERGY_SOURCES``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dynavit.accel.energy import ENERGY_SOURCES, SRAM_ENERGY_EXPONENT, sram_pj_per_bit
from dynavit.accel.zigzag_memory import kib_bits, zigzag_memory, zigzag_name
from dynavit.errors import DynavitError

PE_DIMS = ("auto", "K", "rows")
OBJECTIVES = ("edp", "energy", "latency")
_INT_FIELDS = ("vector_size", "lanes", "pes", "data_bits", "accum_bits", "dram_bandwidth_bits_per_cycle",
               "global_buffer_bandwidth_bits_per_cycle", "vector_unit_width")
_OPTIONAL_ENERGY = ("weight_buffer_pj_per_bit", "input_buffer_pj_per_bit", "accum_buffer_pj_per_bit",
                    "global_buffer_pj_per_bit")
_NON_NEGATIVE = ("mac_pj", "reg_pj_per_bit", "dram_pj_per_bit", "vector_op_pj", *_OPTIONAL_ENERGY)


@dataclass(frozen=True)
class Arch:
    """One accelerator design. Sizes are per PE unless named global; bandwidths in bits/cycle.

    Energies are pJ per MAC, per bit accessed, or per vector element-operation. A buffer
    energy of ``None`` means "from its size" (``sram_pj_per_bit``), so ``with_`` on a buffer
    size moves its access energy too.
    """

    name: str
    vector_size: int  # V: MACs per vector unit (a V-wide dot product over input channels)
    lanes: int  # L: vector units per PE (output channels)
    pes: int  # P: PEs
    weight_buffer_kib: float
    input_buffer_kib: float
    accum_buffer_kib: float
    global_buffer_kib: float
    dram_bandwidth_bits_per_cycle: int
    global_buffer_bandwidth_bits_per_cycle: int = 2048
    data_bits: int = 8
    accum_bits: int = 24
    clock_ghz: float = 1.0
    pe_dim: str = "auto"  # what the PEs split: "K", "rows" (tokens / output pixels) or "auto"
    # keep a layer's activations in the global buffer when they fit (else ZigZag's default: DRAM)
    activations_on_chip: bool = True
    # what the mapper minimises per layer: "edp" (energy x delay), "energy" or "latency"
    mapping_objective: str = "edp"
    mac_pj: float = 0.04
    reg_pj_per_bit: float = 0.00125
    weight_buffer_pj_per_bit: float | None = None
    input_buffer_pj_per_bit: float | None = None
    accum_buffer_pj_per_bit: float | None = None
    global_buffer_pj_per_bit: float | None = None
    dram_pj_per_bit: float = (700 + 750) / 2 / 64
    # the vector (post-processing) unit for non-MAC ops; modelled by accel.vector, not here.
    # 64 elements/cycle for every preset (an assumption), so a vector-size sweep varies the MAC array only
    vector_unit_width: int = 64
    vector_op_pj: float = 0.03

    def __post_init__(self) -> None:
        _validate(self)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Arch:
        """A named design point (``PRESETS``)."""
        if name not in PRESETS:
            raise DynavitError(f"unknown accelerator preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "design") -> Arch:
        """A design from a mapping; ``preset: NAME`` starts from a preset and overrides its fields."""
        if not isinstance(data, dict):
            raise DynavitError(f"{source}: a design must be a mapping of fields, not {type(data).__name__}")
        data = dict(data)
        base: dict[str, Any] = {}
        if "preset" in data:
            preset = data.pop("preset")
            if not isinstance(preset, str) or preset not in PRESETS:
                raise DynavitError(f"{source}: field 'preset': unknown preset {preset!r}; "
                                   f"presets: {', '.join(PRESETS)}")
            base = asdict(PRESETS[preset])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DynavitError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}; "
                               f"known fields: {', '.join(sorted(known))}")
        merged = {**base, **data}
        missing = [f.name for f in fields(cls) if f.name not in merged and _required(f)]
        if missing:
            raise DynavitError(f"{source}: missing field(s) {', '.join(map(repr, missing))} "
                               f"(or name a base design with 'preset:')")
        try:
            return cls(**merged)
        except DynavitError as err:
            raise DynavitError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Arch:
        """A design from a YAML file (see ``from_dict``); errors name the file and the field."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except OSError as err:
            raise DynavitError(f"cannot read accelerator design {p}: {err.strerror or err}") from None
        except yaml.YAMLError as err:
            raise DynavitError(f"accelerator design {p} is not valid YAML: {err}") from None
        if data is None:
            raise DynavitError(f"accelerator design {p} is empty")
        if isinstance(data, dict) and "name" not in data:
            data = {**data, "name": p.stem}
        return cls.from_dict(data, source=str(p))

    def with_(self, **changes: Any) -> Arch:
        """A copy with some fields changed (validated), for design-space exploration."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise DynavitError(f"design {self.name}: unknown field(s) {', '.join(map(repr, unknown))}")
        return replace(self, **changes)

    # --- derived quantities --------------------------------------------------------------
    @property
    def peak_macs_per_cycle(self) -> int:
        return self.vector_size * self.lanes * self.pes

    def buffer_pj_per_bit(self, buffer: str) -> float:
        """Access energy per bit of ``weight``, ``input``, ``accum`` or ``global`` buffer."""
        explicit = getattr(self, f"{buffer}_buffer_pj_per_bit")
        return float(explicit) if explicit is not None else sram_pj_per_bit(getattr(self, f"{buffer}_buffer_kib"))

    @property
    def global_buffer_read_pj_per_bit(self) -> float:
        return self.buffer_pj_per_bit("global")

    @property
    def global_buffer_write_pj_per_bit(self) -> float:
        return self.buffer_pj_per_bit("global")

    def key(self) -> str:
        """Stable hash of every field (the name included): a cache key for results on this design."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        """Write this design as a dynavit design YAML (``from_yaml`` reads it back)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return p

    # --- ZigZag ---------------------------------------------------------------------------
    def to_zigzag(self, on_chip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The ZigZag 3.9 accelerator description (what ``to_zigzag_yaml`` writes).

        Operands: I1 = input activations, I2 = weights (or, for attention, the second
        activation), O = outputs. ``served_dimensions`` are the array dimensions a memory
        instance is shared over: a per-PE buffer serves D1 and D2 and is replicated over the
        PEs (D3); the global buffer and DRAM serve all three.

        ``on_chip`` names operands whose whole tensor lives in the global buffer for the
        layer (ZigZag then starts and ends them there instead of in DRAM); I2 in it also
        routes the weight path through the global buffer (attention's second activation).
        """
        v, lanes, bits, acc = self.vector_size, self.lanes, self.data_bits, self.accum_bits
        reg = self.reg_pj_per_bit
        gb_ops = ["I1", "I2", "O"] if "I2" in on_chip else ["I1", "O"]
        dram_ops = [op for op in ("I1", "I2", "O") if op not in on_chip]
        mems = {
            "w_reg": zigzag_memory(bits, reg, bits, ["I2"], []),
            "in_reg": zigzag_memory(bits, reg, bits, ["I1"], ["D2"]),
            "acc_reg": zigzag_memory(acc, reg, acc, ["O"], ["D1"], port_per_direction=True),
            "weight_buffer": zigzag_memory(kib_bits(self.weight_buffer_kib), self.buffer_pj_per_bit("weight"),
                                           v * lanes * bits, ["I2"], ["D1", "D2"], min_bw=bits),
            "input_buffer": zigzag_memory(kib_bits(self.input_buffer_kib), self.buffer_pj_per_bit("input"),
                                          v * bits, ["I1"], ["D1", "D2"], min_bw=bits),
            "accum_buffer": zigzag_memory(kib_bits(self.accum_buffer_kib), self.buffer_pj_per_bit("accum"),
                                          lanes * acc, ["O"], ["D1", "D2"], min_bw=bits),
            "global_buffer": zigzag_memory(kib_bits(self.global_buffer_kib), self.buffer_pj_per_bit("global"),
                                           self.global_buffer_bandwidth_bits_per_cycle, gb_ops, ["D1", "D2", "D3"],
                                           min_bw=bits),
        }
        if dram_ops:
            mems["dram"] = zigzag_memory(10**12, self.dram_pj_per_bit, self.dram_bandwidth_bits_per_cycle, dram_ops,
                                         ["D1", "D2", "D3"], min_bw=bits, single_port=True)
        return {
            "name": zigzag_name(self.name),
            "memories": mems,
            "operational_array": {
                "unit_energy": float(self.mac_pj),
                "unit_area": 1.0,
                "dimensions": ["D1", "D2", "D3"],
                "sizes": [v, lanes, self.pes],
            },
        }

    def to_zigzag_yaml(self, path: str | Path) -> Path:
        """Write the ZigZag accelerator YAML (usable with ``zigzag.api`` directly)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# generated by dynavit from design {self.name} ({self.key()})\n"
                     + yaml.safe_dump(self.to_zigzag(), sort_keys=False))
        return p

    def to_zigzag_mapping_yaml(self, path: str | Path) -> Path:
        """A ZigZag mapping YAML for running ZigZag on this design without dynavit.

        It gives ZigZag *hints* (C on the vector, K on the lanes, K or rows on the PEs) and
        lets its spatial-mapping search pick factors; the bridge instead fixes the spatial
        mapping per layer (``dynavit.accel.zigzag.spatial_mapping``).
        """
        links = {"O": "O", "W": "I2", "I": "I1"}
        rows = {"Conv": ["K", "OX", "OY"], "Gemm": ["K", "D"], "MatMul": ["K", "D", "H"]}
        entries = [{"name": "default", "spatial_mapping_hint": {"D1": ["C"], "D2": ["K"], "D3": ["K", "OX"]},
                    "memory_operand_links": links}]
        entries += [{"name": op, "spatial_mapping_hint": {"D1": ["C"], "D2": ["K"], "D3": d3},
                     "memory_operand_links": links} for op, d3 in rows.items()]
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(entries, sort_keys=False))
        return p


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _validate(a: Arch) -> None:
    """Type and range checks; every message names the field (callers add the file)."""
    choices = {"pe_dim": PE_DIMS, "mapping_objective": OBJECTIVES}
    for f in fields(a):
        value = getattr(a, f.name)
        if f.name == "name":
            if not isinstance(value, str) or not value:
                raise DynavitError(f"field 'name' must be a non-empty string, not {value!r}")
        elif f.name in choices:
            if value not in choices[f.name]:
                raise DynavitError(f"field {f.name!r} must be one of {', '.join(choices[f.name])}, not {value!r}")
        elif f.name == "activations_on_chip":
            if not isinstance(value, bool):
                raise DynavitError(f"field {f.name!r} must be true or false, not {value!r}")
        elif value is None and f.name in _OPTIONAL_ENERGY:
            continue
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DynavitError(f"field {f.name!r} must be a number, not {value!r}")
        elif f.name in _INT_FIELDS and value != int(value):
            raise DynavitError(f"field {f.name!r} must be an integer, not {value!r}")
        elif value < 0 or (value == 0 and f.name not in _NON_NEGATIVE):
            raise DynavitError(f"field {f.name!r} must be {'>=' if f.name in _NON_NEGATIVE else '>'} 0, not {value!r}")
        else:  # YAML may give 8.0 or 32: keep types exact so key() is stable
            object.__setattr__(a, f.name, int(value) if f.name in _INT_FIELDS else float(value))


def _simba_like(name: str, vector_size: int, *, mem_scale: float = 1.0) -> Arch:
    """16 PEs x (64 / V) lanes x V-wide vectors = 1024 MACs/cycle, Simba's per-PE buffers.

    Simba's PE (Shao et al., MICRO 2019) is 8 lanes of 8-wide vector MACs with a 32 KB weight
    buffer, an 8 KB input buffer and a 3 KB accumulation buffer, 16 PEs and a 64 KB global
    buffer per chiplet (4 TOPS peak). Keeping PEs, per-PE MACs and buffers fixed while V
    varies isolates the vector width, the knob the paper sweeps.
    """
    return Arch(name=name, vector_size=vector_size, lanes=64 // vector_size, pes=16,
                weight_buffer_kib=32 * mem_scale, input_buffer_kib=8 * mem_scale,
                accum_buffer_kib=3 * mem_scale, global_buffer_kib=64 * mem_scale,
                dram_bandwidth_bits_per_cycle=256)


PRESETS: dict[str, Arch] = {
    **{f"simba-v{v}": _simba_like(f"simba-v{v}", v) for v in (8, 16, 32, 64)},
    "simba-v16-bigmem": _simba_like("simba-v16-bigmem", 16, mem_scale=4.0),
}

__all__ = ["ENERGY_SOURCES", "OBJECTIVES", "PE_DIMS", "PRESETS", "SRAM_ENERGY_EXPONENT", "Arch", "sram_pj_per_bit"]
