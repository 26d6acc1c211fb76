"""Lowering: the operations one execution path really executes, with shapes.

The path is run once on the CPU under a ``TorchDispatchMode`` (the same dispatch level the
profiler counts at, with the same op classification from ``dynavit.cost.flops``), so what the
lowering lists is what executed after skipping, slicing and token reduction: nothing masked,
nothing missed. Convolutions and matmuls become ``MacOp``s; a fused attention kernel becomes
its two GEMMs (QK^T, AV) plus its softmax; every other op that writes new data becomes a
``VecOp``. Views (reshape, transpose, slice) write nothing and are dropped.

Token counts of fixed-count reduction (``token_keep`` or ToMe's constant ``token_r``, any method)
do not depend on the image; the adaptive threshold's do, so ``lower_mean`` lowers such a path on
real images one at a time and averages each op's shape: on one random input DeiT-tiny's 0.895
merge keeps 39 % of the MACs, on photos 55 % on average.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dynavit.accel.layers import MacOp, VecOp
from dynavit.config import ExecConfig
from dynavit.cost import flops
from dynavit.cost.flops import ModuleStack, op_costs, param_storage_checker
from dynavit.errors import DynavitError


@dataclass
class Lowered:
    """One path at one input: its MAC layers and vector ops, each with the module that ran it."""

    config: ExecConfig
    input_shape: tuple[int, ...]
    mac_ops: list[MacOp] = field(default_factory=list)
    mac_modules: list[str] = field(default_factory=list)
    vec_ops: list[VecOp] = field(default_factory=list)
    vec_modules: list[str] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return int(self.input_shape[0])

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.mac_ops)


def _mac_ops(name: str, args: tuple, kwargs: dict, out: Any, is_param: Any, bits: int) -> list[MacOp]:
    """Shapes of a conv / matmul / fused-attention op in the ``MacOp`` vocabulary."""
    if name in flops._CONV:
        x, w = args[0], args[1]
        transposed = "transpose" in name or (name in ("convolution", "_convolution") and len(args) > 6
                                             and bool(args[6]))
        if transposed:
            raise DynavitError("transposed convolution cannot be lowered to the accelerator template yet")
        stride = args[3] if len(args) > 3 else kwargs.get("stride", (1,) * (w.dim() - 2))
        groups = args[8] if len(args) > 8 else kwargs.get("groups", 1)
        o = out[0] if isinstance(out, (tuple, list)) else out
        if w.dim() == 3:  # conv1d: treat the length as OX
            return [MacOp("conv", B=int(x.shape[0]), G=int(groups), K=int(w.shape[0]) // int(groups),
                          C=int(w.shape[1]), OX=int(o.shape[-1]), FX=int(w.shape[-1]), SX=int(stride[0]), bits=bits)]
        sy, sx = (int(stride[0]), int(stride[1])) if len(stride) > 1 else (int(stride[0]),) * 2
        op = MacOp("conv", B=int(x.shape[0]), G=int(groups), K=int(w.shape[0]) // int(groups), C=int(w.shape[1]),
                   OY=int(o.shape[-2]), OX=int(o.shape[-1]), FY=int(w.shape[-2]), FX=int(w.shape[-1]),
                   SY=sy, SX=sx, bits=bits)
        iy, ix = int(x.shape[-2]), int(x.shape[-1])
        if (iy, ix) != op.input_hw:  # zero padding: the input read is the real one
            op = dataclasses.replace(op, IY=iy, IX=ix)
        return [op]
    if name in flops._QUANTIZED_LINEAR:  # precision="int8": int8 weights and activations
        x, o = args[0], out[0] if isinstance(out, (tuple, list)) else out
        return [MacOp("linear", B=int(x.numel() // x.shape[-1]), K=int(o.shape[-1]), C=int(x.shape[-1]),
                      bits=min(bits, 8))]
    if name in flops._MM:
        macs, a, b = flops._mm_cost(name, args)
        if name == "linear":
            rows = int(a.numel() // a.shape[-1])
            return [MacOp("linear", B=rows, K=int(b.shape[0]), C=int(b.shape[1]), bits=bits)]
        kind = "linear" if (is_param(a) or is_param(b)) else "attention"
        m = int(a.shape[-2]) if a.dim() >= 2 else 1
        k = int(a.shape[-1])
        n = int(b.shape[-1]) if b.dim() >= 2 else 1
        groups = macs // max(m * n * k, 1)
        if kind == "linear":  # a batch of rows against one weight: the rows are one GEMM
            return [MacOp("linear", B=m * groups, K=n, C=k, bits=bits)]
        return [MacOp("attention", B=m, K=n, C=k, G=groups, bits=bits)]
    if name in flops._SDPA:
        q, k, v = args[0], args[1], args[2]
        if name in ("_flash_attention_forward", "_efficient_attention_forward"):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        g = int(q.numel() // (q.shape[-2] * q.shape[-1]))
        lq, lk, e, ev = int(q.shape[-2]), int(k.shape[-2]), int(q.shape[-1]), int(v.shape[-1])
        return [MacOp("attention", B=lq, K=lk, C=e, G=g, bits=bits),
                MacOp("attention", B=lq, K=ev, C=lk, G=g, bits=bits)]
    return []


class LowerMode(TorchDispatchMode):
    """Records every executed op as ``MacOp``s or ``VecOp``s, attributed to its module."""

    def __init__(self, module: torch.nn.Module, stack: ModuleStack, bits: int) -> None:
        super().__init__()
        self.is_param = param_storage_checker(module)
        self.stack = stack
        self.bits = bits
        self.result: list[tuple[str, MacOp | VecOp]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        where = self.stack.stack[-1] if self.stack.stack else ""
        costs = op_costs(func, args, kwargs, out, self.is_param)
        if any(c.cls in flops.MAC_CLASSES for c in costs):
            for op in _mac_ops(name, args, kwargs, out, self.is_param, self.bits):
                self.result.append((where, op))
            for c in costs:  # the softmax inside a fused attention kernel
                if c.cls not in flops.MAC_CLASSES:
                    scores = c.flops // 5
                    self.result.append((where, VecOp(c.cls, name, scores, scores, c.flops, self.bits)))
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        written = [t for t in outs if t.untyped_storage().data_ptr() not in in_ptrs]
        if name.endswith("_") and outs:  # in-place: writes its first argument
            written = outs[:1]
        n_out = sum(t.numel() for t in written)
        if n_out == 0:  # a view or a no-op: moves no data
            return out
        n_in = sum(t.numel() for t in ins)
        cost = costs[0]
        self.result.append((where, VecOp(cost.cls, name, n_in, n_out, cost.flops, self.bits)))
        return out


def lower(dm: Any, cfg: ExecConfig | None = None, *, pixel_values: torch.Tensor | None = None,
          batch: int = 1, input_size: tuple[int, int] | None = None, bits: int = 8) -> Lowered:
    """Run ``cfg`` once on ``pixel_values`` (default: a fixed random image) and list what executed.

    The model's own path is put back afterwards: lowering is a measurement, not a switch.
    """
    previous = dm.exec_config if hasattr(dm, "exec_config") else None
    if cfg is not None:
        dm.configure(cfg)
    cfg = dm.exec_config if previous is not None else ExecConfig()
    x = pixel_values if pixel_values is not None else dm.example_input(batch, input_size)
    module = dm.module
    stack = ModuleStack(module)
    try:
        with torch.inference_mode(False), torch.no_grad():
            mode = LowerMode(module, stack, bits)
            with mode:
                dm(x)
    finally:
        stack.remove()
        if previous is not None and previous != cfg:
            dm.configure(previous)
    low = Lowered(cfg, tuple(x.shape))
    for where, op in mode.result:
        if isinstance(op, MacOp):
            low.mac_ops.append(op)
            low.mac_modules.append(where)
        else:
            low.vec_ops.append(op)
            low.vec_modules.append(where)
    return low


def lower_mean(dm: Any, cfg: ExecConfig, images: Sequence[torch.Tensor], *, bits: int = 8) -> Lowered:
    """``cfg`` lowered on each of ``images`` (batch 1) and averaged op by op, each size rounded.

    For paths whose token counts depend on the image: the cost of the mean shapes, one ZigZag search per
    op as for any path, rather than one search per image's counts. An attention score product (N x N)
    of the mean count slightly undercounts the mean of the products.
    """
    if not images:
        raise DynavitError("lower_mean needs at least one image")
    lows = [lower(dm, cfg, pixel_values=x, bits=bits) for x in images]
    first = lows[0]
    if any(_ops_run(lo) != _ops_run(first) for lo in lows):
        raise DynavitError(f"{cfg!r}: the images ran different operations; their costs cannot be averaged "
                           "op by op")
    return Lowered(first.config, first.input_shape,
                   [_mean_op(ops) for ops in zip(*(lo.mac_ops for lo in lows), strict=True)], list(first.mac_modules),
                   [_mean_op(ops) for ops in zip(*(lo.vec_ops for lo in lows), strict=True)], list(first.vec_modules))


def _ops_run(low: Lowered) -> tuple:
    """Which ops ran where, without their sizes."""
    return (tuple(zip(low.mac_modules, (o.kind for o in low.mac_ops), strict=True)),
            tuple(zip(low.vec_modules, ((v.cls, v.op) for v in low.vec_ops), strict=True)))


def _mean_op(ops: tuple[Any, ...]) -> Any:
    """One op whose integer sizes are the rounded means of ``ops`` (the same op on different images)."""
    sizes = {f.name: round(sum(getattr(o, f.name) for o in ops) / len(ops))
             for f in dataclasses.fields(ops[0]) if isinstance(getattr(ops[0], f.name), int)}
    return dataclasses.replace(ops[0], **sizes)
