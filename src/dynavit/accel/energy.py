"""The accelerator template's default energies, and where each number comes from.

``ENERGY_SOURCES`` says the same in code. They are **not** MAGNet's 5 nm numbers, which are not
published; they are the numbers ZigZag 3.9 ships in its example designs
(``zigzag/inputs/hardware/*.yaml``; the files do not state the technology node), so results are
comparable to ZigZag's own examples:

- MAC: 0.04 pJ per 8-bit MAC (``unit_energy`` of tpu_like, edge_tpu_like, ascend_like);
- registers: 0.00125 pJ/bit (rf_1B: 0.01 pJ per 8-bit access; rf_2B: 0.02 pJ per 16 bits);
- SRAM buffers, per bit and access, as a function of the buffer size (so that a bigger buffer
  costs more per access, the trade-off a memory-size sweep is about): a power law through
  two ZigZag SRAMs, each taken as the mean of its read and write cost per bit of its port
  width: sram_32KB of edge_tpu_like (22.9 / 52.01 pJ per 512 bits -> 0.0731 pJ/bit) and
  sram_2MB of tpu_like (416.16 / 378.4 pJ per 2048 bits -> 0.1940 pJ/bit), i.e.
  ``e(size) = 0.0731 * (size / 32 KiB) ** 0.2345`` pJ/bit. Any buffer's energy can be set
  explicitly instead (``*_pj_per_bit``);
- DRAM: 11.33 pJ/bit, the mean of ZigZag's ``dram`` (700 pJ read / 750 pJ write per 64 bits).

For scale, Horowitz (ISSCC 2014, 45 nm) gives 0.2 pJ for an 8-bit multiply plus 0.03 pJ
for an 8-bit add, and 1.3-2.6 nJ per 64-bit DRAM access; relative, not absolute, energies are
what a design comparison needs.
"""

from __future__ import annotations

import math

_SRAM_SMALL_KIB, _SRAM_SMALL_PJ_PER_BIT = 32.0, (22.9 + 52.01) / 2 / 512  # edge_tpu_like sram_32KB
_SRAM_LARGE_KIB, _SRAM_LARGE_PJ_PER_BIT = 2048.0, (416.16 + 378.4) / 2 / 2048  # tpu_like sram_2MB
SRAM_ENERGY_EXPONENT = math.log(_SRAM_LARGE_PJ_PER_BIT / _SRAM_SMALL_PJ_PER_BIT) / math.log(
    _SRAM_LARGE_KIB / _SRAM_SMALL_KIB)

ENERGY_SOURCES = {
    "mac_pj": "ZigZag 3.9 example designs (tpu_like/edge_tpu_like/ascend_like.yaml): unit_energy 0.04 pJ",
    "reg_pj_per_bit": "ZigZag rf_1B (0.01 pJ / 8 bit) and rf_2B (0.02 pJ / 16 bit)",
    "sram": (f"power law through ZigZag sram_32KB (edge_tpu_like, {_SRAM_SMALL_PJ_PER_BIT:.4f} pJ/bit) and "
             f"sram_2MB (tpu_like, {_SRAM_LARGE_PJ_PER_BIT:.4f} pJ/bit), exponent {SRAM_ENERGY_EXPONENT:.4f}"),
    "dram_pj_per_bit": "ZigZag dram: (700 pJ read + 750 pJ write) / 2 per 64-bit access",
    "vector_op_pj": "Horowitz ISSCC 2014 (45 nm): 8-bit add 0.03 pJ",
}


def sram_pj_per_bit(size_kib: float) -> float:
    """Energy per bit of one access of an SRAM of ``size_kib`` (the documented power law)."""
    return _SRAM_SMALL_PJ_PER_BIT * (size_kib / _SRAM_SMALL_KIB) ** SRAM_ENERGY_EXPONENT


__all__ = ["ENERGY_SOURCES", "SRAM_ENERGY_EXPONENT", "sram_pj_per_bit"]
