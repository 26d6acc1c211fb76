"""Compensation at calibration: measure what removed units contribute, choose how to restore it.

After calibration has ordered the channels and heads, one forward pass of the full model over
the calibration images records, for every width-sliced layer (each block's MLP ``fc2`` and
attention output projection, a SegFormer decoder's classifier), the mean and covariance of its
input (and of a SegFormer decoder's ``fuse``, all branches' maps side by side), and for every
block the mean output of its attention and MLP sub-layers. The corrections are closed-form from
these (``knobs.compensate``). Which one a model gets is measured, not
assumed: each method ("none", "bias", "matrix") is installed in turn and scored by the mean
KL(full || reduced) over reduced paths on calibration images held out from the fit; the lowest
wins. Skipped sub-layers get their mean added back only if that lowers the held-out KL of the
single-skip paths; dropped decoder branches are predicted from the kept ones only if that lowers
the held-out KL of the single-drop paths. With ``matrix``, the ridge of each group of layers (MLPs,
attention projections, a decoder's classifier) is chosen the same way, on the probes of that
group's knob: on DeiT-tiny the heads' correction wants a ridge 300 times the MLPs'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.knobs import compensate
from dynavit.knobs.width import recording

FILE = "compensation.safetensors"
FOCUS = (None, 0.0, 0.08, 0.16, 0.25)  # focus fractions a CLS-token ViT's calibration compares per MLP width
RIDGES = (1e-3, 1e-2, 0.1, 0.3, 1.0)  # ridge candidates per group, relative to the kept channels' mean variance
GROUP_KNOBS = {"mlp": "mlp_width", "heads": "heads", "fuse": "decoder_width"}  # a group's layers -> its knob


@dataclass
class Compensation:
    """Per-layer input statistics and per-sub-layer output means, and the method the held-out images chose."""

    method: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "mlp.i" | "heads.i" | "fuse.0" | "fuse.in" -> (mean, cov)
    skips: dict[str, torch.Tensor] = field(default_factory=dict)  # "attn.i" | "mlp.i" -> (1 or 2, C)
    skip_means: bool = False  # whether skipped sub-layers get their mean back
    branch_fix: bool = False  # whether dropped decoder branches are predicted from the kept ones
    comparison: dict[str, float] = field(default_factory=dict)  # method (and "skip_*") -> held-out mean KL
    ridges: dict[str, float] = field(default_factory=dict)  # group ("mlp", "heads", "fuse") -> chosen ridge
    focus: tuple[tuple[float, float | None], ...] | None = None  # (MLP width, focus fraction or off), knobs.focus

    def __post_init__(self) -> None:
        if self.focus is not None:  # from JSON: lists
            self.focus = tuple((float(w), None if f is None else float(f)) for w, f in self.focus)

    def identity(self) -> str:
        ridges = "".join(f":{g}={r:g}" for g, r in sorted(self.ridges.items()))
        focus = "" if self.focus is None else f":focus={self.focus}"
        branches = ":branches" if self.branch_fix else ""
        h = hashlib.sha1(f"{self.method}:{self.skip_means}{branches}{ridges}{focus}".encode())
        for key in sorted(self.layers):
            h.update(key.encode() + self.layers[key][0].double().sum().item().hex().encode())
        return h.hexdigest()[:12]

    def meta(self) -> dict[str, Any]:
        return {"method": self.method, "skip_means": self.skip_means, "branch_fix": self.branch_fix,
                "comparison": self.comparison, "ridges": self.ridges, "focus": self.focus}

    def save(self, folder: Path) -> None:
        tensors = {f"layer.{k}.mean": m.contiguous() for k, (m, _) in self.layers.items()}
        tensors |= {f"layer.{k}.cov": c.contiguous() for k, (_, c) in self.layers.items()}
        tensors |= {f"skip.{k}": v.contiguous() for k, v in self.skips.items()}
        tmp = folder / (FILE + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(folder / FILE)

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any]) -> Compensation:
        try:
            t = load_file(str(folder / FILE))
        except (OSError, ValueError) as e:
            raise DynavitError(f"cannot read the compensation in {folder}: {e}") from None
        names = {k.rsplit(".", 1)[0][len("layer."):] for k in t if k.startswith("layer.")}
        layers = {n: (t[f"layer.{n}.mean"], t[f"layer.{n}.cov"]) for n in names}
        skips = {k[len("skip."):]: v for k, v in t.items() if k.startswith("skip.")}
        return cls(layers=layers, skips=skips, **meta)

    def install(self, module: nn.Module, method: str | None = None, skip_means: bool | None = None,
                branch_fix: bool | None = None) -> None:
        """Put the corrections on ``module``'s layers (replacing any); the keyword arguments override."""
        compensate.uninstall(module)
        install_focus(module, self.focus)
        method = self.method if method is None else method
        targets = layer_targets(module)
        for key, (mean, cov) in self.layers.items():
            if key in targets and method != "none":
                stats = compensate.LayerStats(mean, cov if method == "matrix" else None, method,
                                              ridge=self.ridges.get(group(key), compensate.RIDGE))
                compensate.install(targets[key], stats)
        if self.skip_means if skip_means is None else skip_means:
            subs = sublayer_targets(module)
            for key, mean in self.skips.items():
                if key in subs:
                    compensate.install_skip(subs[key], mean)
        fuse = fuse_target(module)
        if fuse is not None and "fuse.in" in self.layers and (self.branch_fix if branch_fix is None else branch_fix):
            compensate.install(fuse, compensate.LayerStats(*self.layers["fuse.in"], "matrix"))


def install_focus(module: nn.Module, table: tuple[tuple[float, float | None], ...] | None) -> None:
    """A CLS-token ViT's MLPs focus by ``table`` (``knobs.focus``; None: every token narrowed alike)."""
    if getattr(module, "family", "") != "vit":
        return
    for b in module.blocks:
        compensate.install_focus(b.mlp, table)


def group(key: str) -> str | None:
    """The group whose ridge a layer key takes (None: a decoder's ``fuse`` input keeps the default)."""
    return None if key == "fuse.in" else key.split(".")[0]


def layer_targets(module: nn.Module) -> dict[str, nn.Module]:
    """The width-sliced layers a correction applies to, by key."""
    out: dict[str, nn.Module] = {}
    for i, b in enumerate(module.blocks):
        out[f"mlp.{i}"], out[f"heads.{i}"] = b.mlp.fc2, b.attn.o
    decoder = getattr(module, "decoder", None)
    if decoder is not None:
        out["fuse.0"] = decoder.classifier
    return out


def fuse_target(module: nn.Module) -> nn.Module | None:
    """A SegFormer decoder's ``fuse`` (its input: every branch's map), where dropped branches are corrected."""
    return getattr(getattr(module, "decoder", None), "fuse", None)


def sublayer_targets(module: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for i, b in enumerate(module.blocks):
        out[f"attn.{i}"], out[f"mlp.{i}"] = b.attn, b.mlp
    return out


class _Moments:
    """Recorder: sums of each width-sliced layer's full-width input (and each sub-layer's output)."""

    def __init__(self, module: nn.Module, cls_token: bool) -> None:
        self.route = {id(m): k for k, m in layer_targets(module).items()}
        self.subs = {id(m): k for k, m in sublayer_targets(module).items()}
        self.width = {k: compensate.weight_matrix(m).shape[1] for k, m in layer_targets(module).items()}
        fuse = fuse_target(module)
        if fuse is not None:
            self.route[id(fuse)] = "fuse.in"
            self.width["fuse.in"] = compensate.weight_matrix(fuse).shape[1]
        self.cls = cls_token
        self.sums: dict[str, list] = {}
        self.out_sums: dict[str, list] = {}

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> None:
        key = self.route.get(id(layer))
        if key is not None:
            z = _features(key, x.detach())
            if z is not None and z.shape[-1] == self.width[key]:
                z = z.double()
                s = self.sums.setdefault(key, [0, 0.0, 0.0])
                s[0], s[1], s[2] = s[0] + len(z), s[1] + z.sum(0), s[2] + z.T @ z
            return
        key = self.subs.get(id(layer))
        if key is not None:
            x = x.detach().double()
            parts = [x[:, 0], x[:, 1:].reshape(-1, x.shape[-1])] if self.cls else [x.reshape(-1, x.shape[-1])]
            s = self.out_sums.setdefault(key, [[0, 0.0] for _ in parts])
            for acc, p in zip(s, parts, strict=True):
                acc[0], acc[1] = acc[0] + len(p), acc[1] + p.sum(0)

    def result(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        layers = {}
        for key, (n, s1, s2) in self.sums.items():
            mean = s1 / n
            layers[key] = (mean.float(), (s2 / n - torch.outer(mean, mean)).float())
        skips = {k: torch.stack([(s / n).float() for n, s in parts]) for k, parts in self.out_sums.items()}
        return layers, skips


def _features(key: str, x: torch.Tensor) -> torch.Tensor | None:
    """(samples, channels) from a layer's input: tokens (..., C), heads (B, h, N, d), maps (B, C, H, W)."""
    if key.startswith("heads"):
        return None if x.dim() != 4 else x.transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3])
    if key.startswith("fuse"):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def measure(dm: Any, batches: Sequence[torch.Tensor], bar: Any = None) -> Compensation:
    """The full path's statistics over ``batches`` (``dm`` in its calibrated order); method not chosen yet."""
    rec = _Moments(dm.module, bool(dm.space.cls_token))
    dm.configure(ExecConfig())
    compensate.uninstall(dm.module)
    with torch.no_grad(), recording(rec):
        for x in batches:
            dm(x)
            if bar is not None:
                bar.update(len(x))
    layers, skips = rec.result()
    if not layers:
        raise DynavitError("no width-sliced layer was observed: this family has nothing to compensate")
    return Compensation(method="none", layers=layers, skips=skips)


def choose(comp: Compensation, dm: Any, probes: Sequence[ExecConfig], skip_probes: Sequence[ExecConfig],
           score: Callable[[Sequence[ExecConfig]], float], methods: Sequence[str] = compensate.METHODS,
           branch_probes: Sequence[ExecConfig] = ()) -> None:
    """Set ``comp.method``, ``skip_means`` and ``branch_fix`` to what scores lowest (``score``: held-out mean KL)."""
    for m in methods:
        comp.install(dm.module, method=m, skip_means=False)
        comp.comparison[m] = score(probes)
    comp.method = min(methods, key=lambda m: comp.comparison[m])
    if comp.method == "matrix":
        choose_ridges(comp, dm, probes, score)
    comp.install(dm.module, skip_means=False)
    choose_focus(comp, dm, probes, score)
    if skip_probes and comp.skips:
        for on in (False, True):
            comp.install(dm.module, skip_means=on)
            comp.comparison[f"skip_means={on}"] = score(skip_probes)
        comp.skip_means = comp.comparison["skip_means=True"] < comp.comparison["skip_means=False"]
    if branch_probes and "fuse.in" in comp.layers:
        for on in (False, True):
            comp.install(dm.module, branch_fix=on)
            comp.comparison[f"branch_fix={on}"] = score(branch_probes)
        comp.branch_fix = comp.comparison["branch_fix=True"] < comp.comparison["branch_fix=False"]
    comp.install(dm.module)


def ridge_probes(comp: Compensation, probes: Sequence[ExecConfig]) -> dict[str, list[ExecConfig]]:
    """Per group with layers in ``comp``, the probes that narrow that group's knob."""
    default, groups = ExecConfig(), {group(k) for k in comp.layers}
    out = {g: [p for p in probes if getattr(p, knob) != getattr(default, knob)] for g, knob in GROUP_KNOBS.items()}
    return {g: ps for g, ps in out.items() if ps and g in groups}


def choose_ridges(comp: Compensation, dm: Any, probes: Sequence[ExecConfig],
                  score: Callable[[Sequence[ExecConfig]], float]) -> None:
    """Each group's ridge: the candidate whose correction scores lowest on that group's probes.

    How much to trust the fit images' covariance differs by layer kind: on DeiT-tiny the nearly
    unregularised solve of removed heads fits the fit images far better than unseen ones, the MLPs'
    does not; the held-out probes say how much shrinkage pays.
    """
    for g, ps in ridge_probes(comp, probes).items():
        for r in RIDGES:
            comp.ridges[g] = r
            comp.install(dm.module, skip_means=False)
            comp.comparison[f"ridge.{g}={r:g}"] = score(ps)
        comp.ridges[g] = min(RIDGES, key=lambda r, g=g: comp.comparison[f"ridge.{g}={r:g}"])



def choose_focus(comp: Compensation, dm: Any, probes: Sequence[ExecConfig],
                 score: Callable[[Sequence[ExecConfig]], float]) -> None:
    """Per MLP-width probe, the fraction of ``FOCUS`` whose focused path scores lowest (CLS-token ViTs only).

    One fraction for every width would be judged mostly by the narrowest probe, whose KL dwarfs
    the others'; each width band gets its own (``knobs.focus.fraction`` takes the nearest probe's).
    """
    ps = ridge_probes(comp, probes).get("mlp")
    if not ps or getattr(dm.module, "family", "") != "vit":
        return
    table = []
    for p in sorted(ps, key=lambda p: p.mlp_width):
        for f in FOCUS:
            install_focus(dm.module, ((p.mlp_width, f),))
            comp.comparison[f"focus.{p.mlp_width:g}={f}"] = score([p])
        table.append((p.mlp_width, min(FOCUS, key=lambda f, p=p: comp.comparison[f"focus.{p.mlp_width:g}={f}"])))
    comp.focus = tuple(table)
    install_focus(dm.module, comp.focus)
