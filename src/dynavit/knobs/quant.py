"""The ``precision`` knob: the blocks' linear layers in int8, fp16 or bf16, beside the fp32 weights.

int8 is dynamic quantization: weights in int8 with one scale per output channel (symmetric),
activations quantized per tensor at run time inside the kernel. The int8 weights of a layer
are made once (on the first int8 configure, at ``load(..., dtype="int8")``, or on first use)
and kept beside the fp32 ones; switching precision is a plan switch like any other knob.

Why this kernel (2-core AMD EPYC Zen 3, AVX2+FMA, no VNNI, torch 2.13 CPU, 2 threads, DeiT-tiny
layer shapes at batch 32, whole layer including activation quantization; the machine was shared,
so ranges are given; ``benchmarks/int8_deit.py`` repeats the last three):

- torchao 0.18 (``Int8DynamicActivationInt8WeightConfig``; installs with ``--no-deps`` and runs
  on torch 2.13 CPU, and its ``Int8Tensor`` slices by rows and columns): 56 GOP/s against 148
  GFLOP/s for fp32 in the same run, 2.6x *slower*: its CPU path is not a fused int8 GEMM. Not
  used (and importing it makes transformers load its CUDA extensions at every start).
- ``torch._int_mm`` with per-row activation quantization written in PyTorch: 460-600 GOP/s on
  fc1 (192->768) but 25 on fc2 (768->192): the quantize/rescale passes around the GEMM dominate.
- ``quantized::linear_dynamic`` (fbgemm, prepacked per-channel int8 weights, activation
  quantization fused in the kernel): 775-1070 GOP/s on fc1, 230 on fc2, against 150-190 and 58
  GFLOP/s for fp32 ``F.linear``. Used.

fbgemm multiplies prepacked weights only, so a width-sliced layer (the first k output rows of
``fc1``/q/k/v, the first k input columns of ``fc2``/the output projection) is packed once per
(rows, columns) it runs with, from the int8 weights: packing copies bytes (about 1 ms a layer),
it never quantizes again. ``pack_bytes`` reports what the packs hold. ``REDUCE_RANGE = False``:
8-bit activations. fbgemm's AVX2 kernel (no VNNI) sums u8 x s8 pairs in int16 with saturation, so
torch defaults to 7-bit activations there; measured on DeiT-tiny over 400 held-out ImageNet sample
photographs, 7-bit activations cost 0.75 pt of top-1 (95.0 % top-1 agreement with fp32) and 8-bit
ones none (+0.25 pt, 96.2 % agreement), at the same speed. int8 runs on CPU (fbgemm); fp16/bf16 need a device with the
arithmetic: on this CPU bf16 GEMM runs at ~1 GFLOP/s, so they are refused there unless the
caller opts in.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynavit.config import ConfigError

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
BYTES_PER_WEIGHT = {"fp32": 4, "int8": 1, "fp16": 2, "bf16": 2}  # what a weight costs to store and move
REDUCE_RANGE = False  # 8-bit activations (see the module docstring)

# fp32 -> low-precision conversions and fbgemm packs made so far (tests check a switch makes none)
counts = {"quantized": 0, "packed": 0, "cast": 0}


@dataclass
class LowPrecision:
    """One layer's low-precision weights, made from its fp32 weights at ``version``."""

    version: tuple[int, int]
    qweight: torch.Tensor | None = None  # (out, in) int8
    scale: torch.Tensor | None = None  # (out,) float64
    packs: dict[tuple[int, int, int], object] = field(default_factory=dict)  # (offset, rows, cols) -> packed
    half: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict)


# per layer, outside the module tree (a deep copy or state_dict never sees fbgemm's packed objects)
_stores: weakref.WeakKeyDictionary[nn.Linear, LowPrecision] = weakref.WeakKeyDictionary()


def _version(lin: nn.Linear) -> tuple[int, int]:
    return lin.weight._version, -1 if lin.bias is None else lin.bias._version


def _store(lin: nn.Linear) -> LowPrecision:
    """The layer's store, rebuilt when its fp32 weights changed since (calibration, training)."""
    s = _stores.get(lin)
    v = _version(lin)
    if s is None or s.version != v:
        s = _stores[lin] = LowPrecision(v)
    return s


def _per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights with one float64 scale per output row."""
    with torch.no_grad():
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        return torch.round(w / scale[:, None].float()).clamp_(-127, 127).to(torch.int8), scale


def _quantize(lin: nn.Linear, s: LowPrecision) -> None:
    s.qweight, s.scale = _per_channel(lin.weight)
    counts["quantized"] += 1


def _pack(lin: nn.Linear, s: LowPrecision, offset: int, rows: int, cols: int) -> object:
    if s.qweight is None:
        _quantize(lin, s)
    r = slice(offset, offset + rows)
    zero = torch.zeros(rows, dtype=torch.long)
    with warnings.catch_warnings():  # torch deprecates quantized tensor creation; fbgemm still reads them
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(s.qweight[r, :cols].contiguous(), s.scale[r], zero, 0)
        bias = None if lin.bias is None else lin.bias.detach()[r].float().contiguous()
        packed = torch.ops.quantized.linear_prepack(q, bias)
    s.packs[(offset, rows, cols)] = packed
    counts["packed"] += 1
    return packed


def pack_matrix(w: torch.Tensor, b: torch.Tensor | None) -> object:
    """An fbgemm pack of any fp32 (out, in) matrix (a compensated slice), quantized as layers are."""
    qweight, scale = _per_channel(w)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(qweight.contiguous(), scale, zero, 0)
        packed = torch.ops.quantized.linear_prepack(q, None if b is None else b.detach().float().contiguous())
    counts["packed"] += 1
    return packed


def run_packed(x: torch.Tensor, packed: object) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)


def linear(x: torch.Tensor, lin: nn.Linear, precision: str, offset: int, rows: int, cols: int) -> torch.Tensor:
    """``lin`` at ``precision`` on output rows ``offset:offset+rows`` and the first ``cols`` inputs."""
    s = _stores.get(lin)
    if s is None or s.version != _version(lin):
        s = _store(lin)
    if precision == "int8":
        packed = s.packs.get((offset, rows, cols))
        if packed is None:
            packed = _pack(lin, s, offset, rows, cols)
        return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
    dtype = HALF[precision]
    pair = s.half.get((dtype, x.device)) or _cast(lin, s, dtype, x.device)
    r = slice(offset, offset + rows)
    w, b = pair[0][r, :cols], None if pair[1] is None else pair[1][r]
    return F.linear(x.to(dtype), w, b).to(x.dtype)


def _cast(lin: nn.Linear, s: LowPrecision, dtype: torch.dtype, device: torch.device) -> tuple:
    with torch.no_grad():
        bias = None if lin.bias is None else lin.bias.detach().to(device, dtype)
        pair = (lin.weight.detach().to(device, dtype), bias)
    s.half[(dtype, device)] = pair
    counts["cast"] += 1
    return pair


def linears(module: nn.Module) -> list[nn.Linear]:
    """The layers the precision knob changes: every ``nn.Linear`` in a family's blocks."""
    blocks = getattr(module, "blocks", None)
    if blocks is None:
        return []
    seen: dict[int, nn.Linear] = {}
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            seen.setdefault(id(m), m)
    return list(seen.values())


def prepare(module: nn.Module, precision: str) -> int:
    """Make ``module``'s int8 weights now (once: a later call finds them); returns the layers made."""
    if precision != "int8":
        return 0
    made = 0
    for lin in linears(module):
        s = _store(lin)
        if s.qweight is None:
            _quantize(lin, s)
            made += 1
    return made


def pack_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes held beside the fp32 weights: int8 weights, fbgemm packs (one per width run), half copies."""
    out = {"int8_weights": 0, "packs": 0, "n_packs": 0, "half": 0}
    for lin in linears(module):
        s = _stores.get(lin)
        if s is None:
            continue
        if s.qweight is not None:
            out["int8_weights"] += s.qweight.numel() + s.scale.numel() * 8
        for (_, rows, cols) in s.packs:
            out["packs"] += rows * cols + rows * 4  # int8 weights + fp32 bias (fbgemm also keeps offsets)
            out["n_packs"] += 1
        out["half"] += sum(w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
                           for w, b in s.half.values())
    return out


def check_device(precision: str, device: torch.device, *, allow_cpu_half: bool = False) -> None:
    """Refuse a precision the device cannot run usefully, saying why."""
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"precision='int8' runs on CPU (fbgemm kernels); the model is on {device}: "
                          "use fp16 or bf16 there")
    if precision in HALF and device.type == "cpu" and not allow_cpu_half:
        raise ConfigError(f"precision={precision!r} on CPU is refused: this CPU has no {precision} matrix "
                          "arithmetic (bf16 GEMM runs at ~1 GFLOP/s against ~170 for fp32), so it would only be "
                          "slower; use int8 on CPU, run on CUDA, or set model.allow_cpu_half = True to run it anyway")
