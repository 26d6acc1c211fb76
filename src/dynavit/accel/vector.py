"""A small vector-unit model for the operations ZigZag leaves at zero cost.

ZigZag costs convolutions and GEMMs; softmax, LayerNorm, GELU, residual adds, resizes and
token gather/merge cost nothing there, although in a ViT they touch every activation several
times per block. MAGNet/Simba-style designs run them on a post-processing vector unit beside
the PE array; this models that unit with four numbers of the design (``Arch``):

- throughput: ``vector_unit_width`` element-operations per cycle. An op costs
  ``ceil(max(flops, elements written) / width)`` cycles: arithmetic ops by their FLOPs (the
  profiler's per-element conventions: LayerNorm 8, GELU 8, softmax 5, add 1), pure data movement
  (cat, gather, copy) by the elements it writes;
- energy: ``vector_op_pj`` per element-operation, plus the operands read from and the results
  written to the global buffer (its read/write energy per bit);
- DRAM: an op whose operands and results do not fit in the global buffer streams them from and
  to DRAM (DRAM energy per bit; cycles bounded below by the DRAM bandwidth).

The unit does not overlap with the PE array (a path's latency is the sum of its layers):
pessimistic for designs that pipeline the two, but it never hides a vector op's cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dynavit.accel.layers import VecOp, ceil_div


@dataclass(frozen=True)
class VecCost:
    cycles: float
    energy_vector_pj: float  # the unit's arithmetic
    energy_buffers_pj: float  # global-buffer reads and writes
    energy_dram_pj: float

    @property
    def energy_pj(self) -> float:
        return self.energy_vector_pj + self.energy_buffers_pj + self.energy_dram_pj

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "energy_pj": self.energy_pj}


def cost_vec_op(op: VecOp, arch: Any) -> VecCost:
    """Cycles and energy of one vector op on ``arch`` (an ``accel.arch.Arch``)."""
    work = max(op.flops, op.elems_out)
    cycles = ceil_div(work, arch.vector_unit_width)
    bits_in, bits_out = op.elems_in * op.bits, op.elems_out * op.bits
    buffers = bits_in * arch.global_buffer_read_pj_per_bit + bits_out * arch.global_buffer_write_pj_per_bit
    dram = 0.0
    if (bits_in + bits_out) / 8 > arch.global_buffer_kib * 1024:
        dram = (bits_in + bits_out) * arch.dram_pj_per_bit
        cycles = max(cycles, ceil_div(bits_in + bits_out, arch.dram_bandwidth_bits_per_cycle))
    return VecCost(float(cycles), work * arch.vector_op_pj, buffers, dram)
