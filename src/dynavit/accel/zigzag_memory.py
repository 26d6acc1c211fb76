"""The pieces of a ZigZag 3.9 accelerator description: memories with their ports and energies.

Kept apart from the template (``dynavit.accel.arch``) because they are ZigZag's format, not the
design's parameters: ``Arch.to_zigzag`` composes them.
"""

from __future__ import annotations

from typing import Any


def zigzag_name(name: str) -> str:
    """``name`` with every character ZigZag does not take in a design name replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "design"


def kib_bits(kib: float) -> int:
    """A size in KiB as whole bits (ZigZag's unit)."""
    return int(round(kib * 1024 * 8))


def zigzag_memory(size_bits: int, pj_per_bit: float, bw_bits: int, operands: list[str], served: list[str], *,
                  min_bw: int | None = None, single_port: bool = False, port_per_direction: bool = False
                  ) -> dict[str, Any]:
    """One ZigZag memory: ports, their allocation and the energy of one ``bw_bits``-wide access.

    ZigZag charges ``r_cost``/``w_cost`` per access of the port's maximum width, and counts
    accesses at the granularity of its minimum width, so the energy per access is
    ``pj_per_bit x bandwidth_max``. Input operands are written from above (``fh``) and read
    towards the MACs (``tl``); outputs also travel up (``fl`` in, ``th`` out).
    ``port_per_direction`` gives each direction its own port, as ZigZag's output registers
    have (rf_2B): an accumulator that swaps partial sums with the buffer above while the MACs
    update it needs two reads and two writes per cycle.
    """
    inputs, output = [op for op in operands if op != "O"], "O" in operands
    reads = [f"{op}, tl" for op in inputs] + (["O, tl", "O, th"] if output else [])
    writes = [f"{op}, fh" for op in inputs] + (["O, fh", "O, fl"] if output else [])
    lo = min(min_bw or bw_bits, bw_bits)

    def port(name: str, kind: str, allocation: list[str]) -> dict[str, Any]:
        return {"name": name, "type": kind, "bandwidth_min": lo, "bandwidth_max": bw_bits, "allocation": allocation}

    if single_port:
        ports = [port("rw_port_1", "read_write", reads + writes)]
    elif port_per_direction:
        ports = [port(f"r_port_{i}", "read", [a]) for i, a in enumerate(reads, 1)]
        ports += [port(f"w_port_{i}", "write", [a]) for i, a in enumerate(writes, 1)]
    else:
        ports = [port("r_port_1", "read", reads), port("w_port_1", "write", writes)]
    cost = float(pj_per_bit) * bw_bits
    return {"size": int(size_bits), "r_cost": cost, "w_cost": cost, "area": 0.0, "latency": 1,
            "operands": list(operands), "ports": ports, "served_dimensions": list(served)}


__all__ = ["kib_bits", "zigzag_memory", "zigzag_name"]
