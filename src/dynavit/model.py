"""``DynamicModel``: one loaded model, any execution path, switched in O(1); a ``torch.nn.Module``.

``dynavit.load(name)`` opens the source model (``models/hub.py``), and the family registry
picks dynavit's own forward pass for it (``models/registry.py``); a model no family runs keeps
its own forward and only the default path. The module tree is the source model's (``.model``),
so ``.to()``, ``.half()``, ``.eval()``, ``.parameters()`` and ``.state_dict()`` behave as
PyTorch users expect; the family implementation shares those very parameter tensors and is
kept outside the tree, so nothing is counted twice.

``configure(cfg)`` validates the config against the model's ``Space`` once, caches the
resolved ``Plan`` by config, and hands it to the family model: no weight copies, no
allocation of parameter memory, no recompilation. A rejected config leaves the model in its
previous configuration. Multiplexed models (``dynavit.multiplex``) and variants attach beside
the base model and are selected by ``ExecConfig(mux=N)`` and ``ExecConfig(variant=name)``.
``ExecConfig(precision="int8")`` runs the blocks' linear layers on int8 weights made once, on the
first configure that asks for them (``dynavit.knobs.quant``), and kept beside the fp32 ones.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynavit import calibrate as calibration_
from dynavit import multiplex
from dynavit.config import ConfigError, ExecConfig, Plan, Space, resolve
from dynavit.data.transforms import ClassificationTransform, SegmentationTransform
from dynavit.deploy import compiled as deploy_compiled
from dynavit.deploy import export as deploy_export
from dynavit.errors import DynavitError
from dynavit.knobs import compensate, quant
from dynavit.models import hub
from dynavit.models.base import FamilyModel
from dynavit.models.registry import family_class
from dynavit.models.static import StaticModel
from dynavit.packaging import read_extras, write_pretrained


class DynamicModel(nn.Module):
    """A model ready for inference on any of its execution paths, with what evaluation needs."""

    allow_cpu_half = False  # fp16/bf16 on a CPU without their arithmetic is refused unless set

    def __init__(self, src: hub.Source) -> None:
        super().__init__()
        self.model = src.module  # the source library's model: the module tree and its parameters
        self.family, self.task, self.source = src.family, src.task, src.name
        self.id2label, self.input_size = dict(src.id2label), tuple(src.input_size)
        self.mean, self.std, self.crop_pct = tuple(src.mean), tuple(src.std), src.crop_pct
        self.preprocessor = dict(src.preprocessor)
        self.variants = nn.ModuleDict()  # name -> DynamicModel of the same family
        self.muxes = nn.ModuleDict()  # str(N) -> multiplexed model trained for N images per pass
        self.calibration: calibration_.Calibration | None = None
        cls = family_class(src.module)
        impl = cls(src.module, self.input_size) if cls is StaticModel else cls(src.module)
        # outside the module tree: it shares the source's parameters, which must not count twice
        object.__setattr__(self, "_base", impl)
        object.__setattr__(self, "_active", impl)
        self._config = ExecConfig()
        self._plans: dict[tuple[str | None, ExecConfig], tuple[FamilyModel, Plan]] = {}

    # ---- what the model is ---------------------------------------------------------------------
    @property
    def module(self) -> FamilyModel:
        """The family implementation running the current path."""
        return self._active

    @property
    def base_module(self) -> FamilyModel:
        """The family implementation of this model itself (not of a variant or multiplexed model)."""
        return self._base

    @property
    def reference(self) -> nn.Module:
        """The source library's model (shares every parameter): the reference the family reproduces."""
        return self.model

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def dynamic(self) -> bool:
        """True when a family runs the model, so it has execution paths beyond the default."""
        return not isinstance(self._base, StaticModel)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def multiplexers(self) -> dict[int, FamilyModel]:
        """Attached multiplexed models by the N each was trained for."""
        return {int(n): m for n, m in self.muxes.items()}

    @property
    def transform(self) -> ClassificationTransform | SegmentationTransform:
        """The standard evaluation transform for this model (DeiT protocol, or resize for segmentation)."""
        return eval_transform(self.task, self.input_size, self.mean, self.std, self.crop_pct)

    @property
    def space(self) -> Space:
        """The current model's knobs; ``max_mux`` counts the attached multiplexed models."""
        return self._knobs(self.module.space)

    def _knobs(self, space: Space) -> Space:
        if space.any_resolution and tuple(self.input_size) != space.default_resolution:
            space = dataclasses.replace(space, default_resolution=tuple(self.input_size))
        if self.muxes and space.max_mux == 1:
            space = dataclasses.replace(space, max_mux=max(self.multiplexers))
        return space

    @property
    def exec_config(self) -> ExecConfig:
        return self._config

    def space_for(self, cfg: ExecConfig) -> Space:
        """The knobs of the model that runs ``cfg``: a variant's own (it may have fewer blocks or heads)."""
        if cfg.variant is None or cfg.mux > 1:
            return self._knobs(self._base.space)  # not ``space``: that is the active (maybe a variant's) model's
        if cfg.variant not in self.variants:
            names = ", ".join(sorted(self.variants)) or "none loaded"
            raise ConfigError(f"variant={cfg.variant!r} is not loaded (variants: {names})")
        return self.variants[cfg.variant].space

    def plan_for(self, cfg: ExecConfig) -> Plan:
        """``cfg`` resolved against the space of the model that runs it; a ConfigError names the variant."""
        try:
            return resolve(cfg, self.space_for(cfg))
        except ConfigError as e:
            if cfg.variant is None or "is not loaded" in str(e):
                raise
            raise ConfigError(f"variant {cfg.variant!r} ({self.variants[cfg.variant].source}): {e}") from None

    def memory_held(self) -> dict[str, dict[str, int]]:
        """Bytes each loaded model holds, by variant ("base": this model): its parameters and buffers, and
        what knobs keep beside them (int8 and half copies, compensation's statistics and solved weights);
        this model's entry also counts its multiplexed models. What a deployment pays per variant."""
        def held(dm: DynamicModel, tree: nn.Module) -> dict[str, int]:
            params = sum(p.numel() * p.element_size() for p in tree.parameters())
            buffers = sum(b.numel() * b.element_size() for b in tree.buffers())
            packs, comp = quant.pack_bytes(dm.base_module), compensate.held_bytes(dm.base_module)
            out = {"parameters": params, "buffers": buffers,
                   "precision_copies": packs["int8_weights"] + packs["packs"] + packs["half"],
                   "compensation": comp["statistics"] + comp["solved"]}
            return {**out, "total": sum(out.values())}
        base = held(self, nn.ModuleList([self.model, self.muxes]))
        return {"base": base, **{k: held(v, v.model) for k, v in self.variants.items()}}

    def check_input_size(self, height: int, width: int) -> None:
        """Raise a one-line DynavitError if the model cannot take an input of this size."""
        if height <= 0 or width <= 0:
            raise DynavitError(f"input size {height}x{width} is invalid: both sides must be positive")
        mult = self._base.space.size_multiple
        if height % mult or width % mult:
            raise DynavitError(f"input size {height}x{width} does not fit {self.source} ({self.family}): "
                               f"height and width must be multiples of {mult}")

    def example_input(self, batch: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = size or self.input_size
        self.check_input_size(h, w)
        param = next(self.model.parameters())
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, h, w, generator=g).to(device=param.device, dtype=param.dtype)

    # ---- paths ---------------------------------------------------------------------------------
    def configure(self, cfg: ExecConfig | dict[str, Any] | None = None, **changes: Any) -> DynamicModel:
        """Switch to ``cfg`` (an ExecConfig, a dict, or keyword changes to the default)."""
        if cfg is None:
            cfg = ExecConfig(**changes)
        elif isinstance(cfg, dict):
            cfg = ExecConfig.from_dict(cfg)
        elif not isinstance(cfg, ExecConfig):
            raise ConfigError(f"configure() takes an ExecConfig or a dict, not {type(cfg).__name__} {cfg!r:.60}")
        elif changes:
            cfg = cfg.replace(**changes)
        key = (cfg.variant, cfg)
        hit = self._plans.get(key)
        if hit is None:
            impl = self._impl_for(cfg)
            hit = (impl, resolve(cfg, impl.space))  # raises before anything changes
            self._prepare_precision(impl, cfg.precision)
            self._plans[key] = hit
        impl, plan = hit
        impl.plan = plan
        # plain attributes: nn.Module.__setattr__'s bookkeeping would double the cost of a switch
        object.__setattr__(self, "_active", impl)
        object.__setattr__(self, "_config", cfg)
        return self

    def _prepare_precision(self, impl: FamilyModel, precision: str) -> None:
        """Refuse a precision the device cannot run; make int8 weights once (a later configure finds them)."""
        if precision == "fp32":
            return
        if not self.dynamic:
            raise ConfigError(f"precision={precision!r} needs execution paths; {self.source} ({self.family}) "
                              "runs its own forward in fp32")
        device = next(self.model.parameters()).device
        quant.check_device(precision, device, allow_cpu_half=self.allow_cpu_half)
        quant.prepare(impl, precision)

    def _impl_for(self, cfg: ExecConfig) -> FamilyModel:
        if cfg.mux > 1:
            if cfg.variant is not None:
                raise ConfigError(f"mux={cfg.mux} cannot be combined with variant={cfg.variant!r}")
            fits = sorted(n for n in self.multiplexers if n >= cfg.mux)
            if not fits:
                have = ", ".join(map(str, sorted(self.multiplexers)))
                raise ConfigError(f"mux={cfg.mux} is larger than any attached multiplexed model was trained for "
                                  f"(N: {have})" if have else f"mux={cfg.mux} needs a multiplexed model: attach "
                                  "one with add_multiplexer()")
            return self.multiplexers[fits[0]]  # the smallest that fits: fewest blank slots
        if cfg.variant is None:
            return self._base
        if cfg.variant not in self.variants:
            names = ", ".join(sorted(self.variants)) or "none loaded"
            raise ConfigError(f"variant={cfg.variant!r} is not loaded (variants: {names})")
        return self.variants[cfg.variant].module

    def add_variant(self, name: str, model: DynamicModel | str) -> None:
        """Load another model of the same family and task as a switchable variant."""
        other = load(model) if isinstance(model, str) else model
        if other.family != self.family or other.task != self.task:
            raise ConfigError(f"variant {name!r} is a {other.family} {other.task} model; "
                              f"this model is {self.family} {self.task}")
        if other.num_labels != self.num_labels:
            raise ConfigError(f"variant {name!r} has {other.num_labels} labels, this model {self.num_labels}")
        if name == "base":
            raise ConfigError("'base' names this model itself in memory reports and metrics; name the variant "
                              "otherwise")
        self.variants[name] = other

    def add_multiplexer(self, model: FamilyModel | str | Path) -> FamilyModel:
        """Attach a multiplexed model (or a folder saved by ``dynavit.multiplex.save``) for ``mux=N``."""
        mux = multiplex.load_multiplexer(model, self) if isinstance(model, (str, Path)) else model
        if not isinstance(mux, multiplex.MuxModel):
            raise ConfigError(f"add_multiplexer needs a ConcatPlexer or ImageMultiplexer, got {type(mux).__name__}")
        if mux.num_labels != self.num_labels:
            raise ConfigError(f"the multiplexed model predicts {mux.num_labels} labels, this model {self.num_labels}")
        self.muxes[str(mux.mux)] = mux
        self._plans = {k: v for k, v in self._plans.items() if k[1].mux == 1}  # a new N may change the choice
        return mux

    # ---- calibration ---------------------------------------------------------------------------
    def calibrate(self, images: Any, *, criterion: str = "auto", batch_size: int = 16, compensate: bool = True,
                  progress: bool = False) -> Any:
        """Rank channels/heads/blocks on ``images`` and reorder the weights (see ``dynavit.calibrate``);
        ``compensate``: also restore what removed units contributed (``dynavit.compensation``)."""
        self._need_paths("calibrate")
        with torch.inference_mode(False):  # the taylor criterion needs autograd, even when called in inference mode
            self.calibration = calibration_.calibrate(self, images, criterion=criterion, batch_size=batch_size,
                                                      compensate=compensate, progress=progress)
        return self.calibration

    def save_calibration(self, folder: str | Path) -> Path:
        if self.calibration is None:
            raise ConfigError("nothing to save: call calibrate() first")
        return self.calibration.save(folder)

    def load_calibration(self, folder: str | Path) -> Any:
        """Reorder a freshly loaded model's weights by a calibration saved for the same weights."""
        self._need_paths("load a calibration")
        calib = calibration_.Calibration.load(folder)
        calibration_.apply_saved(self, calib)
        self.calibration = calib
        return calib

    def _need_paths(self, what: str) -> None:
        if not self.dynamic:
            raise DynavitError(f"cannot {what}: {self.source} ({self.family}) has no execution paths "
                               "(no dynavit family runs it)")

    # ---- PyTorch -------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of the current path: (B, labels), or (B, labels, h, w) for segmentation."""
        return self._active(pixel_values)

    def train(self, mode: bool = True) -> DynamicModel:
        super().train(mode)
        self._base.train(mode)  # the family's own wrapper modules sit outside the tree
        return self

    # ---- deployment ----------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, config: ExecConfig | dict[str, Any] | None = None, *,
               format: str = "onnx") -> Path:
        """One path (default: the current one) as a file with only its weights: ONNX or ``torch.export``
        (``dynavit.deploy.export``); a path with data-dependent shapes raises a ``DeployError`` saying why."""
        return deploy_export.export(self, path, config, format=format)

    def compile(self, configs: Any = None, **options: Any) -> deploy_compiled.CompiledPaths:
        """Each of ``configs`` (default: the current path) compiled once, as its own callable, warmed up:
        a model-like object whose ``configure`` switches among them without recompiling
        (``dynavit.deploy.compiled``)."""
        return deploy_compiled.compile_paths(self, configs, **options)

    def save_pretrained(self, folder: str | os.PathLike, *, half: bool = False) -> Path:
        """A Hugging Face folder (weights in their calibrated order) that ``dynavit.load`` reads back
        calibrated, with any attached multiplexed models; transformers reads it as the source model.
        ``half``: fp16 weights on disk (loaded back as fp32)."""
        if self.variants:
            raise DynavitError("save_pretrained saves one model: save each variant on its own")
        return write_pretrained(self, Path(folder), half=half)


def eval_transform(task: str, input_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
                   crop_pct: float) -> ClassificationTransform | SegmentationTransform:
    """A model's evaluation transform from what describes it (a loaded model, or an exported menu's metadata)."""
    size = tuple(input_size)
    if task == "classification":
        return ClassificationTransform(crop=size, resize=int(min(size) / crop_pct), mean=tuple(mean), std=tuple(std))
    return SegmentationTransform(size=size, mean=tuple(mean), std=tuple(std))


LoadedModel = DynamicModel  # the name earlier releases gave models without execution paths


def load(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str = "fp32",
         ) -> DynamicModel:
    """Load a model: a local HF folder (one ``save_pretrained`` wrote, too), a hub id, ``timm:<name>``
    or ``config:<preset>`` (random weights, for cost studies). Errors say how to fix them.
    ``dtype`` (fp32, int8, fp16, bf16) is the precision of the default path: made now, O(1) to switch later."""
    dm = DynamicModel(hub.open_source(name_or_path)).to(device)
    read_extras(dm, Path(str(name_or_path)))
    if dtype != "fp32":
        dm.configure(precision=dtype)
    return dm


def from_config(config: Any, *, seed: int = 0, source: str | None = None) -> DynamicModel:
    """A randomly initialised model from a transformers config (for tests and cost studies)."""
    return DynamicModel(hub.source_from_config(config, seed=seed, source=source))
