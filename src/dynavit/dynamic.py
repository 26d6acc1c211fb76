"""``DynamicModel``: one loaded model, any execution path, switched in O(1).

``configure(cfg)`` validates the config against the model's ``Space`` once, caches the
resolved ``Plan`` by config, and hands it to the family model: no weight copies, no
allocation of parameter memory, no recompilation. A rejected config leaves the model in
its previous configuration. Multiplexed models (``dynavit.multiplex``) attach beside the base
model and are selected by ``ExecConfig(mux=N)``, like variants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynavit.config import ConfigError, ExecConfig, Plan, Space, resolve
from dynavit.models.base import FamilyModel
from dynavit.models.loading import LoadedModel


def _family_class(family: str, model_type: str, module: nn.Module | None = None) -> type[FamilyModel] | None:
    if (family == "vit" and model_type == "vit") or family == "timm":
        from dynavit.models.vit import DynViT, timm_unsupported

        if family == "timm" and (module is None or timm_unsupported(module)):
            return None
        return DynViT
    if family == "segformer":
        try:
            from dynavit.models.segformer import DynSegformer
        except ImportError:
            return None
        return DynSegformer
    if family == "swin":
        try:
            from dynavit.models.swin import DynSwin
        except ImportError:
            return None
        return DynSwin
    return None


def supports(lm: LoadedModel) -> bool:
    model_type = getattr(lm.config, "model_type", "")
    return _family_class(lm.family, model_type, lm.module) is not None


@dataclass(eq=False)
class DynamicModel(LoadedModel):
    """A ``LoadedModel`` whose forward is dynavit's own and takes any ``ExecConfig``."""

    reference: nn.Module | None = None  # the source library's model, sharing every parameter
    variants: dict[str, LoadedModel] = field(default_factory=dict)
    multiplexers: dict[int, FamilyModel] = field(default_factory=dict)  # by the N each was trained for
    _config: ExecConfig = field(default_factory=ExecConfig)
    _plans: dict[tuple[str | None, ExecConfig], tuple[FamilyModel, Plan]] = field(default_factory=dict)
    _base: FamilyModel | None = None
    calibration: Any = None  # dynavit.calibrate.Calibration once calibrated

    @classmethod
    def from_loaded(cls, lm: LoadedModel) -> DynamicModel:
        model_type = getattr(lm.config, "model_type", "")
        fam_cls = _family_class(lm.family, model_type, lm.module)
        if fam_cls is None:
            what = model_type or type(lm.module).__name__
            raise ConfigError(f"no dynamic implementation for {lm.family} ({what}) yet")
        impl = fam_cls(lm.module)
        dm = cls(module=impl, family=lm.family, task=lm.task, id2label=lm.id2label, input_size=lm.input_size,
                 source=lm.source, mean=lm.mean, std=lm.std, crop_pct=lm.crop_pct, extra=dict(lm.extra),
                 reference=lm.module)
        dm._base = impl
        return dm

    # ---- configuration -----------------------------------------------------------------------
    @property
    def space(self) -> Space:
        """The current model's knobs; ``max_mux`` counts the attached multiplexed models."""
        space = self.module.space
        if space.any_resolution and tuple(self.input_size) != space.default_resolution:
            space = dataclasses.replace(space, default_resolution=tuple(self.input_size))
        if self.multiplexers and space.max_mux == 1:
            space = dataclasses.replace(space, max_mux=max(self.multiplexers))
        return space

    @property
    def exec_config(self) -> ExecConfig:
        return self._config

    def configure(self, cfg: ExecConfig | dict[str, Any] | None = None, **changes: Any) -> DynamicModel:
        """Switch to ``cfg`` (an ExecConfig, a dict, or keyword changes to the default)."""
        if cfg is None:
            cfg = ExecConfig(**changes)
        elif isinstance(cfg, dict):
            cfg = ExecConfig.from_dict(cfg)
        elif changes:
            cfg = cfg.replace(**changes)
        key = (cfg.variant, cfg)
        hit = self._plans.get(key)
        if hit is None:
            impl = self._impl_for(cfg)
            hit = (impl, resolve(cfg, impl.space))  # raises before anything changes
            self._plans[key] = hit
        impl, plan = hit
        impl.plan = plan
        self.module = impl
        self._config = cfg
        return self

    def _impl_for(self, cfg: ExecConfig) -> FamilyModel:
        variant = cfg.variant
        if cfg.mux > 1:
            if variant is not None:
                raise ConfigError(f"mux={cfg.mux} cannot be combined with variant={variant!r}")
            fits = sorted(n for n in self.multiplexers if n >= cfg.mux)
            if not fits:
                have = ", ".join(map(str, sorted(self.multiplexers)))
                raise ConfigError(f"mux={cfg.mux} is larger than any attached multiplexed model was trained for "
                                  f"(N: {have})" if have else f"mux={cfg.mux} needs a multiplexed model: attach "
                                  "one with add_multiplexer()")
            return self.multiplexers[fits[0]]  # the smallest that fits: fewest blank slots
        if variant is None:
            return self._base
        if variant not in self.variants:
            names = ", ".join(sorted(self.variants)) or "none loaded"
            raise ConfigError(f"variant={variant!r} is not loaded (variants: {names})")
        return self.variants[variant].module

    def add_variant(self, name: str, model: LoadedModel | str) -> None:
        """Load another model of the same family and task as a switchable variant."""
        from dynavit.models.loading import load

        other = load(model) if isinstance(model, str) else model
        if not isinstance(other, DynamicModel):
            other = DynamicModel.from_loaded(other)
        if other.family != self.family or other.task != self.task:
            raise ConfigError(f"variant {name!r} is a {other.family} {other.task} model; "
                              f"this model is {self.family} {self.task}")
        if other.num_labels != self.num_labels:
            raise ConfigError(f"variant {name!r} has {other.num_labels} labels, this model {self.num_labels}")
        self.variants[name] = other

    def add_multiplexer(self, model: FamilyModel | str | Path) -> FamilyModel:
        """Attach a multiplexed model (or a folder saved by ``dynavit.multiplex.save``) for ``mux=N``."""
        from dynavit.multiplex import MuxModel, load_multiplexer

        mux = load_multiplexer(model, self) if isinstance(model, (str, Path)) else model
        if not isinstance(mux, MuxModel):
            raise ConfigError(f"add_multiplexer needs a ConcatPlexer or ImageMultiplexer, got {type(mux).__name__}")
        if mux.num_labels != self.num_labels:
            raise ConfigError(f"the multiplexed model predicts {mux.num_labels} labels, this model {self.num_labels}")
        self.multiplexers[mux.mux] = mux
        self._plans = {k: v for k, v in self._plans.items() if k[1].mux == 1}  # a new N may change the choice
        return mux

    # ---- calibration -------------------------------------------------------------------------
    def calibrate(self, images: Any, *, criterion: str = "auto", batch_size: int = 16) -> Any:
        """Rank channels/heads/blocks on ``images`` and reorder the weights (see ``dynavit.calibrate``)."""
        from dynavit.calibrate import calibrate

        self.calibration = calibrate(self, images, criterion=criterion, batch_size=batch_size)
        return self.calibration

    def save_calibration(self, folder: str | Path) -> Path:
        if self.calibration is None:
            raise ConfigError("nothing to save: call calibrate() first")
        return self.calibration.save(folder)

    def load_calibration(self, folder: str | Path) -> Any:
        from dynavit.calibrate import Calibration, apply_saved

        calib = Calibration.load(folder)
        apply_saved(self, calib)
        self.calibration = calib
        return calib

    # ---- inference ---------------------------------------------------------------------------
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values)

    def _size_multiple(self) -> int:
        return self.space.size_multiple
