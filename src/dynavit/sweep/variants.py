"""A sweep over several models of one family: the variant is the first dimension of the search space.

Each model (the base and every variant attached with ``add_variant``) gets its own ``SearchSpace``,
built from the same spec against its own ``Space`` and calibration: a variant with fewer blocks
or heads has its own resolutions, block orders and token layers, and a level it cannot take is a
``ConfigError`` naming it. A point is (model, one level per knob); the knobs are the union of the
models' knobs, each as long as its longest, so a point whose level a model lacks is no config
(``VariantSpace.config`` raises, and the sweep counts it invalid). Point (0, ..., 0) is the base
model's default, the reference every row's paired delta is taken against.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynavit.config import ConfigError, ExecConfig
from dynavit.sweep.space import SearchSpace, calibrated_block_order, load_space


@dataclass(frozen=True)
class VariantSpace:
    """Search spaces of several models behind one point shape: (model, level per knob)."""

    names: tuple[str | None, ...]  # None: the base model
    spaces: tuple[SearchSpace, ...]

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k.name for s in self.spaces for k in s.knobs))

    @property
    def shape(self) -> tuple[int, ...]:
        def longest(name: str) -> int:
            return max(len(k.levels) for s in self.spaces for k in s.knobs if k.name == name)
        return (len(self.names), *(longest(n) for n in self.knob_names))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def points(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(n) for n in self.shape))

    def _own(self, point: Sequence[int]) -> tuple[str | None, SearchSpace, tuple[int, ...]]:
        """The model a point names, its space, and the point in that space's own knobs."""
        if len(point) != len(self.shape):
            raise ConfigError(f"a point of this space has {len(self.shape)} levels, not {len(point)}")
        name, space = self.names[point[0]], self.spaces[point[0]]
        levels = dict(zip(self.knob_names, point[1:], strict=True))
        own = {k.name: k for k in space.knobs}
        for knob, level in levels.items():
            size = len(own[knob].levels) if knob in own else 1
            if level >= size:
                raise ConfigError(f"{_model(name)} has {size} level(s) of {knob}, not level {level}")
        return name, space, tuple(levels[k.name] for k in space.knobs)

    def config(self, point: Sequence[int]) -> ExecConfig:
        """The config at a point; a ConfigError when the named model lacks one of its levels."""
        name, space, own = self._own(point)
        cfg = space.config(own)
        return cfg if name is None else cfg.replace(variant=name)

    def describe(self, point: Sequence[int]) -> str:
        name, space, own = self._own(point)
        text = space.describe(own)
        return text if name is None else f"variant={name}" + ("" if text == "default" else f"; {text}")

    def to_json(self) -> dict[str, Any]:
        return {"variant": list(self.names), "spaces": [s.to_json() for s in self.spaces]}


def _model(name: str | None) -> str:
    return "the base model" if name is None else f"variant {name!r}"


def variant_space(spec: str | Path | dict[str, Any], dm: Any, precisions: Sequence[str] = ()) -> VariantSpace:
    """``spec`` expanded for the base model and for every variant of ``dm``, each against its own knobs."""
    names: list[str | None] = [None, *sorted(dm.variants)]
    spaces = []
    for name in names:
        model = dm if name is None else dm.variants[name]
        try:
            spaces.append(load_space(spec, model.space, calibrated_block_order(model.calibration), precisions))
        except ConfigError as e:
            raise ConfigError(f"{_model(name)} ({model.source}): {e}") from None
    return VariantSpace(tuple(names), tuple(spaces))


def sweep_space(spec: str | Path | dict[str, Any], dm: Any, precisions: Sequence[str] = (),
                ) -> SearchSpace | VariantSpace:
    """What a sweep of ``dm`` searches: its own space, or with variants attached, the variant dimension
    and each variant's own knobs, unless the spec names variants itself."""
    own = load_space(spec, dm.space, calibrated_block_order(dm.calibration), precisions)
    if not dm.variants or any("variant" in level for k in own.knobs for level in k.levels):
        return own
    return variant_space(spec, dm, precisions)


def variant_names(models: Sequence[str]) -> list[str]:
    """A unique name per model, from its folder or hub name (``org/deit-small`` -> ``deit-small``)."""
    out: list[str] = []
    for m in models:
        stem = re.split(r"[/\\:]", str(m).rstrip("/\\"))[-1] or "variant"
        name, n = stem, 2
        while name in out or name == "base":  # "base" is what reports call the base model
            name, n = f"{stem}-{n}", n + 1
        out.append(name)
    return out
