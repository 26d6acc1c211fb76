"""Exact operator-class cost counting at the ATen dispatch level.

Why dispatch level: module hooks (fvcore, ptflops, thop) and even torch's own
``FlopCounterMode`` (0 for CPU SDPA in torch 2.13) miss fused attention. A
``TorchDispatchMode`` sees every kernel that actually executes, including the backend
variant that ``scaled_dot_product_attention`` picked, so skipped work is never counted and
executed work never missed.

Conventions (stated once, used everywhere):
- MACs are exact for the three multiply-accumulate classes:
  ``conv`` (convolutions), ``linear`` (a matmul with a parameter operand: the layer's
  weight) and ``attention`` (a matmul whose operands are both activations: QK^T and AV,
  explicit or inside a fused SDPA kernel). FLOPs = 2 x MACs for them; bias additions are
  not counted (as fvcore, mmcv and FlopCounterMode).
- Other classes have no MACs; their FLOPs are estimates per output element:
  ``norm`` (layer/group norm 8, batch norm 4, RMS norm 4), ``activation`` (GELU 8, SiLU /
  sigmoid / tanh 4, ReLU-like 1), ``softmax`` (5: max, subtract, exp, sum, divide; a fused
  SDPA kernel's softmax is counted here too), ``elementwise`` (1), ``resize`` (interpolation: bilinear 8,
  bicubic 32, nearest 0), ``copy`` (cat, clone, gather, pad, roll: data movement, 0) and
  ``other`` (pooling and reductions: 1 per input element; views and anything unknown: 0).
  ``resize`` and ``copy`` have their own classes because on real hardware they can take a
  large share of the time at almost no FLOPs (SegFormer's decoder upsampling on CPU).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CLASSES = (
    "conv", "linear", "attention", "norm", "activation", "softmax", "elementwise", "resize", "copy", "other",
)
MAC_CLASSES = ("conv", "linear", "attention")

aten = torch.ops.aten


def _names(*ops: str) -> frozenset[str]:
    return frozenset(ops)


_CONV = _names(
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "cudnn_convolution",
    "mkldnn_convolution", "convolution_overrideable", "_slow_conv2d_forward",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "cudnn_convolution_transpose",
)
_MM = _names("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addbmm", "_addmm_activation")
_QUANTIZED_LINEAR = _names("linear_dynamic", "linear_dynamic_fp16")  # quantized:: ops (int8 precision)
_SDPA = _names(
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward", "_efficient_attention_forward",
)
_NORM = {
    "native_layer_norm": 8, "layer_norm": 8, "native_group_norm": 8, "group_norm": 8,
    "native_batch_norm": 4, "batch_norm": 4, "_native_batch_norm_legit": 4,
    "_native_batch_norm_legit_no_training": 4, "cudnn_batch_norm": 4, "miopen_batch_norm": 4,
    "rms_norm": 4, "_fused_rms_norm": 4, "instance_norm": 8,
}
_ACT = {
    "gelu": 8, "silu": 4, "sigmoid": 4, "tanh": 4, "hardswish": 4, "mish": 6, "softplus": 4,
    "relu": 1, "relu_": 1, "leaky_relu": 1, "hardtanh": 1, "elu": 3, "hardsigmoid": 2,
    "gelu_": 8, "silu_": 4, "quick_gelu": 4, "threshold": 1, "prelu": 2, "relu6": 1,
}
_SOFTMAX = _names("_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax")
_ELEMENTWISE = _names(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "addcdiv", "pow",
    "sqrt", "rsqrt", "exp", "log", "neg", "abs", "clamp", "clamp_", "clamp_min", "clamp_max",
    "maximum", "minimum", "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt",
    "ge", "erf", "reciprocal", "lerp", "sign", "floor", "ceil", "round", "logical_not",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "remainder", "fmod", "square",
    "sin", "cos", "rsub", "fill_", "zero_", "add_relu", "hypot", "true_divide", "floor_divide",
)
_REDUCE = _names(
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "norm",
    "linalg_vector_norm", "argmax", "argmin", "cumsum", "prod", "logsumexp", "topk", "sort",
    "avg_pool1d", "avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d", "scatter_reduce",
    "scatter_add", "index_add",
)
# FLOPs per output element of interpolation: bilinear 4 mul + 3 add (+1 index), bicubic 4x that
_RESIZE = {
    "upsample_bilinear2d": 8, "_upsample_bilinear2d_aa": 8, "upsample_bicubic2d": 32,
    "_upsample_bicubic2d_aa": 32, "upsample_nearest2d": 0, "_upsample_nearest_exact2d": 0,
    "upsample_nearest1d": 0, "upsample_linear1d": 4, "grid_sampler_2d": 8, "upsample_trilinear3d": 16,
}
# ops that move or duplicate data without arithmetic
_COPY = _names(
    "cat", "stack", "clone", "copy_", "_to_copy", "contiguous", "index", "index_select", "gather",
    "constant_pad_nd", "pad", "reflection_pad2d", "replicate_pad2d", "roll", "scatter", "masked_select",
    "repeat", "_unsafe_index", "embedding", "take_along_dim", "flip", "im2col", "col2im", "new_zeros",
    "zeros_like", "empty_like", "full_like", "ones_like",
)


@dataclass(frozen=True)
class Cost:
    """One operator's contribution to one class."""

    cls: str
    macs: int
    flops: int


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


def _conv_cost(args: tuple, kwargs: dict, out: torch.Tensor, name: str) -> int:
    x, w = args[0], args[1]
    transposed = "transpose" in name
    if name in ("convolution", "_convolution", "convolution_overrideable"):
        transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get("transposed", False))
    k = _numel(w.shape[2:])
    if transposed:
        # every input element is scattered through (C_out/groups x kernel) weights
        return _numel(x.shape) * int(w.shape[1]) * k
    return _numel(out.shape) * int(w.shape[1]) * k


def _mm_cost(name: str, args: tuple) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(MACs, a, b) for matmul-like ops: MACs = output elements x contraction length."""
    if name in ("addmm", "baddbmm", "addbmm", "_addmm_activation"):
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    if name == "linear":  # b is weight (out, in)
        return _numel(a.shape[:-1]) * int(b.shape[0]) * int(b.shape[1]), a, b
    if name == "addbmm":
        return int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[2]), a, b
    k = int(a.shape[-1])
    out_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) if a.dim() > 2 or b.dim() > 2 else ()
    m = int(a.shape[-2]) if a.dim() >= 2 else 1
    n = int(b.shape[-1]) if b.dim() >= 2 else 1
    return _numel(out_shape) * m * n * k, a, b


def op_costs(func: object, args: tuple, kwargs: dict, out: object, is_param: Callable[[object], bool]) -> list[Cost]:
    """Classify one executed ATen op and count its work. Unknown ops are ``other`` with 0 FLOPs."""
    name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
    packet = getattr(func, "overloadpacket", None)
    if packet is not None:
        name = packet.__name__
    first_out = out[0] if isinstance(out, (tuple, list)) and out else out
    out_numel = _numel(first_out.shape) if isinstance(first_out, torch.Tensor) else 0

    if name in _CONV:
        macs = _conv_cost(args, kwargs, first_out, name)
        return [Cost("conv", macs, 2 * macs)]
    if name in _QUANTIZED_LINEAR:  # (input, packed weights, ...): the weights are a layer's, not an activation
        x = args[0]
        macs = _numel(x.shape[:-1]) * int(x.shape[-1]) * int(first_out.shape[-1])
        return [Cost("linear", macs, 2 * macs)]
    if name in _MM:
        macs, a, b = _mm_cost(name, args)
        cls = "linear" if (is_param(a) or is_param(b)) else "attention"
        return [Cost(cls, macs, 2 * macs)]
    if name in _SDPA:
        q, k, v = args[0], args[1], args[2]
        if name in ("_flash_attention_forward", "_efficient_attention_forward"):
            # (B, L, H, E) layout for the raw kernels
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        batch_heads = _numel(q.shape[:-2])
        lq, lk = int(q.shape[-2]), int(k.shape[-2])
        macs = batch_heads * lq * lk * (int(q.shape[-1]) + int(v.shape[-1]))
        scores = batch_heads * lq * lk
        return [Cost("attention", macs, 2 * macs), Cost("softmax", 0, 5 * scores)]
    if name in _NORM:
        return [Cost("norm", 0, _NORM[name] * out_numel)]
    if name in _ACT:
        return [Cost("activation", 0, _ACT[name] * out_numel)]
    if name in _SOFTMAX:
        return [Cost("softmax", 0, 5 * out_numel)]
    if name in _ELEMENTWISE:
        return [Cost("elementwise", 0, out_numel)]
    if name in _RESIZE:
        return [Cost("resize", 0, _RESIZE[name] * out_numel)]
    if name in _COPY:
        return [Cost("copy", 0, 0)]
    if name in _REDUCE:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else first_out
        n_in = _numel(x.shape) if isinstance(x, torch.Tensor) else 0
        return [Cost("other", 0, max(n_in, out_numel))]
    return [Cost("other", 0, 0)]


@dataclass
class OpRecord:
    """Cost of one executed op, attributed to the module stack that ran it."""

    op: str
    costs: list[Cost]
    modules: tuple[str, ...]


@dataclass
class CountResult:
    records: list[OpRecord] = field(default_factory=list)
    peak_activation_bytes: int = 0
    written_activation_bytes: int = 0
    module_order: list[str] = field(default_factory=list)
    module_types: dict[str, str] = field(default_factory=dict)


class ModuleStack:
    """Forward pre/post hooks that keep the stack of module names currently executing."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.order: list[str] = []
        self.types: dict[str, str] = {}
        self._handles = []
        for name, mod in model.named_modules():
            if not name:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._pre(name, type(mod).__name__)))
            self._handles.append(mod.register_forward_hook(self._post(name), always_call=True))

    def _pre(self, name: str, type_name: str):
        def hook(_mod, _args):
            if name not in self.types:
                self.order.append(name)
                self.types[name] = type_name
            self.stack.append(name)

        return hook

    def _post(self, name: str):
        def hook(_mod, _args, _out):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def param_storage_checker(model: nn.Module) -> Callable[[object], bool]:
    """True for tensors that share storage with a model parameter (a weight, or a view of one)."""
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def is_param(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in ptrs

    return is_param


class CostMode(TorchDispatchMode):
    """Records every executed op's costs and module path; optionally times each op.

    Timing: on CPU, kernels are synchronous so a wall clock around the call measures the
    kernel; on CUDA, event pairs around each call (read after a final synchronize).
    """

    def __init__(self, model: nn.Module, stack: ModuleStack, *, time_ops: bool = False,
                 track_memory: bool = False, device: str = "cpu") -> None:
        super().__init__()
        self.is_param = param_storage_checker(model)
        self.stack = stack
        self.time_ops = time_ops
        self.cuda = device.startswith("cuda")
        self.records: list[OpRecord] = []
        self.times: list[float] = []  # seconds per record (CPU) ...
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # ... or event pairs (CUDA)
        self.track_memory = track_memory
        self._live: dict[int, int] = {}
        self._live_bytes = 0
        self.peak_bytes = 0
        self.written_bytes = 0
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.time_ops:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = func(*args, **kwargs)
                end.record()
                self._events.append((start, end))
            else:
                t0 = time.perf_counter()
                out = func(*args, **kwargs)
                self.times.append(time.perf_counter() - t0)
        else:
            out = func(*args, **kwargs)
        self.records.append(
            OpRecord(func.overloadpacket.__name__, op_costs(func, args, kwargs, out, self.is_param),
                     tuple(self.stack.stack))
        )
        if self.track_memory:
            self._track(out)
        return out

    def _track(self, out: object) -> None:
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr == 0 or ptr in self._live or ptr in self._param_ptrs:
                continue
            nbytes = t.untyped_storage().nbytes()
            self._live[ptr] = nbytes
            self._live_bytes += nbytes
            self.written_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self._live_bytes)
            weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self._live_bytes -= self._live.pop(ptr, 0)

    def op_seconds(self) -> list[float]:
        if self.cuda and self._events:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self._events]
        return list(self.times)


def count(model: nn.Module, run: Callable[[], object], *, track_memory: bool = True) -> CountResult:
    """Run ``run()`` once under the counting mode and return every op's cost record."""
    stack = ModuleStack(model)
    try:
        with torch.inference_mode(False), torch.no_grad():
            mode = CostMode(model, stack, track_memory=track_memory)
            with mode:
                out = run()
            del out
    finally:
        stack.remove()
    return CountResult(mode.records, mode.peak_bytes, mode.written_bytes, stack.order, stack.types)


def total_macs(model: nn.Module, run: Callable[[], object]) -> int:
    """Total MACs of one call (conv + linear + attention)."""
    return sum(c.macs for r in count(model, run, track_memory=False).records for c in r.costs)


def macs_per_image(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """MACs by class of one call ``model(x)``, divided by the images in ``x``.

    Per image, so a batch of one, a padded batch and a multiplexed pass of N images compare.
    """
    out: dict[str, float] = {}
    for rec in count(model, lambda: model(x), track_memory=False).records:
        for c in rec.costs:
            if c.macs:
                out[c.cls] = out.get(c.cls, 0.0) + c.macs / len(x)
    return out
