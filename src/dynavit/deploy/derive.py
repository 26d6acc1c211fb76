"""A path's structure as a smaller model of its own: a Hugging Face folder that ``dynavit train`` fine-tunes.

Run-time paths of one model share its weights, so its smallest paths carry the accuracy a width or
block cut costs. A *derived* model starts from the same cut (the calibrated most-important units
first, any calibrated compensation folded in, ``deploy.slice``) but gets a config of its own, so it
can be trained at that size and then served beside the original as a variant (``dynavit sweep A B``).
That is structured pruning followed by fine-tuning, the usual way to a smaller member of a family.

Only what a transformers config can express is derived: MLP width (one ``intermediate_size`` for
ViT; one whole ``mlp_ratios`` entry per SegFormer stage), whole skipped blocks (fewer layers, or fewer
blocks per SegFormer stage) and SegFormer's decoder width. Heads, sub-layer skips, token knobs,
resolution, precision and decoder branches stay run-time knobs: asking for them raises and says so.
A skipped block's calibrated mean output (``compensation`` skip means) is folded into the bias just
before it in the residual stream (exact for SegFormer, whose one mean serves every token); a CLS-token
model's two means (CLS, patches) have no place in a config and are left out, with a warning.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dynavit.config import ExecConfig, Plan
from dynavit.deploy.slice import DeployError, focused_block, slice_to_plan
from dynavit.knobs import compensate
from dynavit.models import hub

_FAMILIES = ("vit", "segformer")
# a block's parameters: "<list prefix><index>.<rest>"; transformers 4 and 5 name the lists differently
_BLOCK_KEY = re.compile(r"^(.*?\.(?:layer|layers|blocks|block\.\d+)\.)(\d+)\.(.*)$")


def derive(dm: Any, config: ExecConfig | dict, folder: str | Path, *, half: bool = False,
           note: str = "") -> Path:
    """Write ``config``'s structure of ``dm`` (calibrated) as a standalone Hugging Face folder."""
    cfg = config if isinstance(config, ExecConfig) else ExecConfig.from_dict(config)
    if dm.family not in _FAMILIES:
        raise DeployError(f"derive supports ViT/DeiT and SegFormer models, not {dm.family}")
    previous = dm.exec_config
    try:
        dm.configure(ExecConfig())
        full = dm.module.plan
        dm.configure(cfg)
        plan = dm.module.plan
        _check_structural(plan, full)
        hf, impl = copy.deepcopy((dm.model, dm.module))  # one copy: impl's layers are hf's layers
        compensate.copy_to(dm.module, impl)
    finally:
        dm.configure(previous)
    focused = _unfocus(impl, plan)
    if focused:
        note = (f"{note}\n\nThe path runs its MLPs focused (the class token and the patch tokens it attends to "
                "most keep every channel); a transformers config has one width for every token, so the "
                "derived model narrows them all alike until it is trained.").strip()
        warnings.warn("the path's focused MLPs are derived at one width for every token (train it before use)",
                      stacklevel=2)
    kept = [i for i, b in enumerate(plan.blocks) if b.attn and b.mlp]
    stage_of = tuple(impl.stage_of) if dm.family == "segformer" else (0,) * len(plan.blocks)
    with torch.no_grad():
        slice_to_plan(impl, plan)
        lost = _fold_skip_means(impl, plan, kept, stage_of)
    if lost:
        note = (f"{note}\n\nThe path adds the calibrated mean output of each skipped block, one for the CLS "
                "token and one for the others; a transformers config has no place for that, so the derived "
                "model leaves it out until it is trained.").strip()
        warnings.warn("the skipped blocks' calibrated mean outputs are not carried into the derived model "
                      "(train it before use)", stacklevel=2)
    small = hub.build_module(_derived_config(dm, plan, kept))
    small.load_state_dict(_renumbered(hf.state_dict(), stage_of, kept), strict=True)
    out = hub.source_from_module(small.eval(), f"{dm.source} derived: {cfg!r}", dm.preprocessor)
    from dynavit.model import DynamicModel  # the model module imports deploy: import at call time

    folder = Path(folder)
    DynamicModel(out).save_pretrained(folder, half=half)
    (folder / "README.md").write_text(_card(dm, cfg, small, note))
    return folder


def _unfocus(impl: Any, plan: Plan) -> bool:
    """Remove the copy's focused MLPs (``knobs.focus``), which a config cannot hold; whether the path had any."""
    focused = any(focused_block(b, p) for b, p in zip(impl.blocks, plan.blocks, strict=True))
    for b in impl.blocks:
        compensate.install_focus(b.mlp, None)
    return focused


def _check_structural(plan: Plan, full: Plan) -> None:
    why = []
    if plan.token_keep < 1 or plan.token_r or plan.token_threshold is not None or any(b.token_op for b in plan.blocks):
        why.append("token knobs")
    if plan.resolution != full.resolution:
        why.append("resolution")
    if any(b.precision != "fp32" for b in plan.blocks):
        why.append("precision")
    if any(b.attn != b.mlp for b in plan.blocks):
        why.append("skipping one sub-layer of a block (skip whole blocks instead)")
    if any(b.heads != f.heads for b, f in zip(plan.blocks, full.blocks, strict=True) if b.attn):
        why.append("heads (a transformers config ties the head count to the width)")
    if plan.mux != 1:
        why.append("multiplexing")
    if plan.decoder_branches != full.decoder_branches:
        why.append("decoder branches")
    if not any(b.attn for b in plan.blocks):
        why.append("skipping every block")
    if why:
        raise DeployError(f"cannot derive a model from {plan.config!r}: {', '.join(why)} stay run-time knobs; "
                          "derive from the MLP width, whole-block skips and decoder width, and run the rest "
                          "on the derived model")


def _fold_skip_means(impl: Any, plan: Plan, kept: list[int], stage_of: tuple[int, ...]) -> bool:
    """Add each skipped block's calibrated mean output where the residual stream last changed before it:
    the previous kept block's ``fc2`` bias in its stage, else the stage's patch-embedding LayerNorm bias.
    Exact when one mean serves every token (SegFormer). True when a mean could not be folded (CLS-token
    models keep one mean for the CLS token and one for the others)."""
    lost = False
    for i, p in enumerate(plan.blocks):
        blk = impl.blocks[i]
        means = [m for m in (compensate.skip_mean(blk.attn), compensate.skip_mean(blk.mlp)) if m is not None]
        if p.attn or p.mlp or not means:
            continue
        if impl.family != "segformer" or any(m.shape[0] != 1 for m in means):
            lost = True
            continue
        before = [j for j in kept if j < i and stage_of[j] == stage_of[i]]
        bias = impl.blocks[before[-1]].mlp.fc2.bias if before else impl.patch_embeds[stage_of[i]].norm.bias
        bias.add_(sum(means)[0].to(bias))
    return lost


def _derived_config(dm: Any, plan: Plan, kept: list[int]) -> Any:
    conf = copy.deepcopy(dm.model.config)
    dims = [plan.blocks[i].mlp_dim for i in kept]
    if dm.family == "vit":
        if len(set(dims)) != 1:
            raise DeployError(f"ViT configs have one intermediate_size; this path keeps {sorted(set(dims))}")
        conf.num_hidden_layers, conf.intermediate_size = len(kept), dims[0]
        return conf
    stages = dm.module.stage_of
    depths = [sum(stages[i] == s for i in kept) for s in range(len(conf.depths))]
    if 0 in depths:
        raise DeployError(f"every SegFormer stage needs a block; this path keeps {depths} per stage")
    ratios = []
    for s, hidden in enumerate(conf.hidden_sizes):
        per = {plan.blocks[i].mlp_dim for i in kept if stages[i] == s}
        k = per.pop()
        if per or k % hidden:  # transformers' SegFormer config takes whole-number MLP ratios
            raise DeployError(f"SegFormer stage {s}: the MLP keeps {sorted(per | {k})} channels; a derived "
                              f"model needs one whole multiple of the stage width {hidden} (mlp_width 0.25, 0.5, 0.75)")
        ratios.append(k // hidden)
    conf.depths, conf.mlp_ratios, conf.decoder_hidden_size = depths, ratios, plan.decoder_dim
    return conf


def _renumbered(state: dict[str, torch.Tensor], stage_of: tuple[int, ...], kept: list[int]
                ) -> dict[str, torch.Tensor]:
    """The cut weights under the derived model's names: kept blocks numbered from 0 in each block list
    (one list per SegFormer stage, in order; one list for ViT)."""
    prefixes = list(dict.fromkeys(m.group(1) for k in state if (m := _BLOCK_KEY.match(k))))
    first = [stage_of.index(s) for s in range(len(prefixes))]
    renamed = {}
    for name, t in state.items():
        m = _BLOCK_KEY.match(name)
        if m is None:
            renamed[name] = t
            continue
        stage = prefixes.index(m.group(1))
        i = first[stage] + int(m.group(2))
        if i in kept:
            j = sum(1 for b in kept if b < i and stage_of[b] == stage)
            renamed[f"{m.group(1)}{j}.{m.group(3)}"] = t
    return renamed


def _card(dm: Any, cfg: ExecConfig, small: torch.nn.Module, note: str) -> str:
    params = sum(p.numel() for p in small.parameters())
    return (f"# Derived from {dm.source}\n\nWritten by `dynavit derive`: the path `{cfg!r}` of the calibrated "
            f"model, cut to its own config ({params / 1e6:.2f} M parameters), calibrated compensation folded in. "
            "Train it (`dynavit train`) before serving it: its accuracy at this point is the path's, "
            f"training-free.\n\n{note}\n")
