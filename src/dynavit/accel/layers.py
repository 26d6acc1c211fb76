"""The operations an execution path really executes, in the form an accelerator model costs.

``MacOp`` is one multiply-accumulate layer in ZigZag's loop-dimension vocabulary, so the
bridge maps it to a workload without guessing:

- convolution: ``O[b][g][k][oy][ox] += W[g][k][c][fy][fx] * I[b][g][c][iy][ix]`` with
  ``iy = SY*oy + fy`` and ``ix = SX*ox + fx`` (``G`` groups; depthwise is ``G = channels, K = C = 1``);
- GEMM with a weight (``linear``): rows are ``B`` (every token of every image), ``K`` output
  features, ``C`` input features, ``OY = OX = FY = FX = G = 1``;
- activation x activation GEMM (``attention``: QK^T and AV): ``G`` independent products (batch x
  heads), each ``B`` rows x ``C`` contraction x ``K`` columns. The second operand is an
  activation, not a weight: it sits in the weight path of the array but is fetched per image.

``VecOp`` is everything else (softmax, norms, activations, elementwise, resize, token
gather/merge, reductions): a class, the elements it reads and writes, and its arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MAC_KINDS = ("conv", "linear", "attention")


@dataclass(frozen=True)
class MacOp:
    kind: str
    B: int
    K: int
    C: int
    OY: int = 1
    OX: int = 1
    FY: int = 1
    FX: int = 1
    SY: int = 1
    SX: int = 1
    G: int = 1
    bits: int = 8  # operand precision (weights and activations); accumulation is wider
    IY: int = 0  # a convolution's real input height and width when zero padding makes them
    IX: int = 0  # smaller than SY*(OY-1)+FY (0: no padding, derived)

    def __post_init__(self) -> None:
        if self.kind not in MAC_KINDS:
            raise ValueError(f"MacOp kind {self.kind!r} is not one of {MAC_KINDS}")
        for name in ("B", "K", "C", "OY", "OX", "FY", "FX", "SY", "SX", "G", "bits"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MacOp {name}={getattr(self, name)} must be >= 1")
        if self.IY < 0 or self.IX < 0:
            raise ValueError(f"MacOp input size IY={self.IY}, IX={self.IX} must be >= 0")

    @property
    def macs(self) -> int:
        return self.B * self.G * self.K * self.C * self.OY * self.OX * self.FY * self.FX

    @property
    def input_hw(self) -> tuple[int, int]:
        return (self.IY or self.SY * (self.OY - 1) + self.FY, self.IX or self.SX * (self.OX - 1) + self.FX)

    @property
    def weight_elems(self) -> int:
        return self.G * self.K * self.C * self.FY * self.FX

    @property
    def input_elems(self) -> int:
        iy, ix = self.input_hw
        return self.B * self.G * self.C * iy * ix

    @property
    def output_elems(self) -> int:
        return self.B * self.G * self.K * self.OY * self.OX

    def key(self) -> tuple:
        """Cache key: everything that determines the cost on a given design."""
        return tuple(asdict(self).values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VEC_CLASSES = ("softmax", "norm", "activation", "elementwise", "resize", "copy", "other")


@dataclass(frozen=True)
class VecOp:
    cls: str  # one of VEC_CLASSES (the profiler's operator classes)
    op: str  # the ATen op name, for the per-layer table
    elems_in: int  # elements read
    elems_out: int  # elements written
    flops: int  # arithmetic, by the profiler's per-element conventions
    bits: int = 8

    def __post_init__(self) -> None:
        if self.cls not in VEC_CLASSES:
            raise ValueError(f"VecOp class {self.cls!r} is not one of {VEC_CLASSES}")
        if min(self.elems_in, self.elems_out, self.flops) < 0:
            raise ValueError(f"VecOp {self.op}: negative size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["MAC_KINDS", "VEC_CLASSES", "MacOp", "VecOp", "ceil_div"]
