"""One execution path as a standalone ``nn.Module`` whose weights are physically cut to that path.

At run time a width or head knob is a view: calibration put the most important units first, so
"keep k" reads the first k rows or columns of the shared weights. A deployed path needs none of
the rest, so ``path_module`` copies the family model that runs the path and cuts every tensor to
what the path reads: fc1 rows and fc2 columns (and SegFormer's depthwise conv) per kept MLP
channel, q/k/v rows and output-projection columns (and Swin's bias-table columns) per kept head,
nothing of a skipped block or sub-layer, nothing of a SegFormer stage or decoder branch that no
kept branch reads, and the decoder cut to its kept width. The path's plan is left as it was:
once the weights are cut, every "first k" in the forward is the whole tensor, so the same
forward runs with no slicing at all, which is what a tracer or compiler then sees. A calibrated
compensation (``knobs.compensate``) is folded into the cut weights (for dropped decoder branches, the
constant into the batch norm's running mean); skipped sub-layers keep their mean as a constant add.
A focused MLP (``knobs.focus``) runs all its channels for the tokens the class token reads: it is
kept whole, and its correction for the other tokens stays installed on the copy (a tracer records
the solved weights as constants).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynavit.config import BlockPlan, ExecConfig, Plan
from dynavit.errors import DynavitError
from dynavit.knobs import compensate
from dynavit.models.base import DerivedCache, FamilyModel


class DeployError(DynavitError):
    """A path that cannot be taken to the requested runtime, and why."""


class PathModule(nn.Module):
    """One execution path, fixed: ``forward(pixel_values)`` is the family forward on the path's plan."""

    def __init__(self, impl: FamilyModel, config: ExecConfig) -> None:
        super().__init__()
        self.impl = impl
        self.config = config

    @property
    def plan(self) -> Plan:
        return self.impl.plan

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.impl(pixel_values)


def unexportable(plan: Plan) -> str:
    """Why a path has no fixed graph ("" when it has one)."""
    if plan.token_threshold is not None or any(b.token_op == "threshold" for b in plan.blocks):
        return (f"token_threshold={plan.token_threshold} keeps a different number of tokens per image "
                "(data-dependent shapes); export a fixed token_keep or token_r instead")
    low = sorted({b.precision for b in plan.blocks} - {"fp32"})
    if low:
        return (f"precision {', '.join(low)} runs PyTorch's own packed kernels, which neither ONNX nor torch.export "
                "can express; export the fp32 path (ONNX Runtime quantizes a model file itself: "
                "onnxruntime.quantization.quantize_dynamic)")
    return ""


def path_module(dm: nn.Module, config: ExecConfig | dict | None = None, *, sliced: bool = True,
                check: bool = True) -> PathModule:
    """A standalone copy of the family model running ``config`` (default: ``dm``'s current path).

    ``sliced``: cut the weights to what the path reads (fewer parameters, smaller files);
    ``check``: refuse paths with data-dependent shapes (``unexportable``). ``dm`` keeps its path.
    """
    previous = dm.exec_config
    cfg = previous if config is None else config if isinstance(config, ExecConfig) else ExecConfig.from_dict(config)
    try:
        dm.configure(cfg)
        impl = dm.module
        plan = impl.plan
        why = unexportable(plan)
        if check and why:
            raise DeployError(f"path {cfg!r} cannot be exported: {why}")
        deadline, impl.deadline = impl.deadline, None
        try:
            source, impl = impl, copy.deepcopy(impl)
            compensate.copy_to(source, impl)
        finally:
            dm.module.deadline = deadline
    finally:
        dm.configure(previous)
    impl.set_plan(plan)
    impl.deadline = None
    impl.eval()
    for p in impl.parameters():
        p.requires_grad_(False)
    _fresh_caches(impl)
    if sliced and hasattr(impl, "blocks") and impl.family in ("vit", "swin", "segformer"):
        with torch.no_grad():
            slice_to_plan(impl, plan)
    if any(focused_block(b, p) for b, p in zip(impl.blocks, plan.blocks, strict=True)):
        with torch.no_grad():  # solve the focused MLPs' live corrections now: a tracer must find real tensors
            impl(dm.example_input(1))
    return PathModule(impl, cfg)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fresh_caches(module: nn.Module) -> None:
    """Derived tensors were keyed by parameter versions of the original: start the copy without them."""
    for m in module.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, DerivedCache):
                setattr(m, name, DerivedCache())


def slice_to_plan(impl: FamilyModel, plan: Plan) -> None:
    """Cut ``impl``'s weights in place to what ``plan`` reads (see the module docstring)."""
    unused = _unused_stages(impl, plan)
    for i, (blk, p) in enumerate(zip(impl.blocks, plan.blocks, strict=True)):
        if i in unused or not (p.attn or p.mlp or p.token_op):
            _drop(blk)
            continue
        if p.attn or p.token_op:  # a block that only reduces tokens reads its queries and keys
            _keep_heads(blk.attn, p.heads)
        else:
            _drop(blk.attn, blk.norm1)
        if p.mlp and focused_block(blk, p):
            pass  # a focused MLP (knobs.focus) runs every channel for some tokens: kept whole, its correction live
        elif p.mlp:
            _keep_mlp(blk.mlp, p.mlp_dim)
        else:
            _drop(blk.mlp, blk.norm2)
    if impl.family == "segformer":
        stages = {impl.stage_of[i] for i in unused}
        _drop(*(impl.patch_embeds[s] for s in stages), *(impl.norms[s] for s in stages))
        _keep_decoder(impl.decoder, plan.decoder_dim, plan.decoder_branches)


def focused_block(blk: nn.Module, p: BlockPlan) -> bool:
    """Whether a ViT block's MLP runs focused on this path (``knobs.focus``)."""
    return getattr(blk, "focus_of", lambda _: None)(p) is not None


def _unused_stages(impl: FamilyModel, plan: Plan) -> set[int]:
    """SegFormer blocks of stages after the last kept decoder branch: never run."""
    if impl.family != "segformer":
        return set()
    last = max(plan.decoder_branches)
    return {i for i, s in enumerate(impl.stage_of) if s > last}


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def _drop(*modules: nn.Module) -> None:
    """Replace every parameter and buffer of ``modules`` (recursively) by an empty tensor: never read."""
    for mod in modules:
        for m in mod.modules():
            for name, t in list(m._parameters.items()):
                if t is not None:
                    m._parameters[name] = _param(t.new_empty(0))
            for name, t in list(m._buffers.items()):
                if t is not None:
                    m._buffers[name] = t.new_empty(0)


def _rows(lin: nn.Module, spans: list[tuple[int, int]]) -> None:
    """Keep the output rows ``spans`` ([start, stop) pairs, concatenated) of a linear layer."""
    lin.weight = _param(torch.cat([lin.weight[a:b] for a, b in spans]))
    if lin.bias is not None:
        lin.bias = _param(torch.cat([lin.bias[a:b] for a, b in spans]))
    lin.out_features = lin.weight.shape[0]


def _columns(lin: nn.Module, k: int) -> None:
    """The first ``k`` input columns; a calibrated correction for the rest is folded into them."""
    fixed = compensate.weights(lin, k)
    if fixed is None:
        lin.weight = _param(lin.weight[:, :k])
    else:
        lin.weight = _param(fixed[0].reshape(lin.weight.shape[0], k, *lin.weight.shape[2:]))
        lin.bias = _param(fixed[1])
    compensate.forget(lin)
    if isinstance(lin, nn.Linear):
        lin.in_features = k
    else:
        lin.in_channels = k


def _keep_heads(attn: nn.Module, heads: int) -> None:
    """The first ``heads`` heads: q/k/v rows (a fused qkv keeps its three row blocks), projection columns."""
    hd = heads * attn.head_dim
    if hd == attn.o.in_features:
        return
    if hasattr(attn, "qkv_parts") and attn.fused:
        _rows(attn.qkv, [(off, off + hd) for _, off in attn.qkv_parts()])
    else:
        for lin in (attn.q, attn.k, attn.v):
            _rows(lin, [(0, hd)])
    _columns(attn.o, hd)
    if hasattr(attn, "rel_bias_table"):  # Swin: the relative-position bias table is (positions, heads)
        attn.rel_bias_table = _param(attn.rel_bias_table[:, :heads])
    attn.num_heads = heads


def _keep_mlp(mlp: nn.Module, k: int) -> None:
    """The first ``k`` hidden channels: fc1 rows (and SegFormer's depthwise conv), fc2 columns."""
    if k == mlp.fc1.out_features:
        return
    _rows(mlp.fc1, [(0, k)])
    _columns(mlp.fc2, k)
    conv = getattr(mlp, "dwconv", None)
    if conv is not None:
        conv.weight = _param(conv.weight[:k])
        if conv.bias is not None:
            conv.bias = _param(conv.bias[:k])
        conv.in_channels = conv.out_channels = conv.groups = k


def _keep_decoder(dec: nn.Module, dim: int, branches: tuple[int, ...]) -> None:
    """SegFormer's head at ``dim`` channels: kept branches' rows, their ``fuse`` column blocks, BN, classifier."""
    full = dec.width
    fix = dec.dropped_fix(dim, branches)
    if fix is not None:  # the kept branches' corrected fuse columns; the constant goes into the batch norm's mean
        for j, i in enumerate(branches):
            start = dec.branch_columns(i).start
            dec.fuse.weight[:dim, start:start + dim] = fix[0][:, j * dim:(j + 1) * dim].reshape(dim, dim, 1, 1)
        dec.bn.running_mean[:dim] -= fix[1]
        compensate.forget(dec.fuse)
    for i, lin in enumerate(dec.linear_c):
        if i in branches:
            if dim < full:
                _rows(lin, [(0, dim)])
        else:
            _drop(lin)
    if dim == full:
        return
    blocks = [dec.branch_columns(dec.num_branches - 1 - j) for j in range(dec.num_branches)]  # column order
    w = dec.fuse.weight[:dim]
    dec.fuse.weight = _param(torch.cat([w[:, s.start:s.start + dim] for s in blocks], dim=1))
    dec.fuse.out_channels, dec.fuse.in_channels = dim, dim * dec.num_branches
    bn = dec.bn
    bn.weight, bn.bias = _param(bn.weight[:dim]), _param(bn.bias[:dim])
    bn.running_mean, bn.running_var = bn.running_mean[:dim].clone(), bn.running_var[:dim].clone()
    bn.num_features = dim
    _columns(dec.classifier, dim)
    dec.width = dim
