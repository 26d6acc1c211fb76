"""The search space of a sweep: knobs, each with an ordered list of levels.

A level is a set of ``ExecConfig`` field changes. Level 0 of every knob is the default (no
change), later levels are progressively cheaper, so "the first k levels" is a resilience
curve and the greedy strategy can walk a knob from mild to aggressive. A config is one level
per knob; knobs must not set the same field.

Space files are JSON::

    {"resolution": [224, 192, 160],
     "mlp_width": [1.0, 0.9, 0.8],
     "skip_blocks": [0, 1, 2],
     "tokens": [{}, {"token_method": "merge", "token_keep": 0.93, "token_layers": "all"}]}

A level is a value of the field named like the knob, or a dict of field changes. Sugar:
``skip_blocks``/``skip_attn``/``skip_mlp`` given as an integer k mean "the k least
important blocks" by the model's calibration (the last k blocks when uncalibrated);
``token_layers: "all"`` means every block.

``precision`` is a knob like the others (levels ``"fp32"``, ``"int8"``, ...): the ``precision``
preset is ``small`` composed with fp32 and int8, and ``load_space(..., precisions=...)`` (``sweep
--dtype``) adds the knob to any space. Level 0 stays fp32, the reference every delta is paired with.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynavit.config import ConfigError, ExecConfig, Space, resolve
from dynavit.errors import DynavitError

_SKIPS = ("skip_blocks", "skip_attn", "skip_mlp")


@dataclass(frozen=True)
class Knob:
    name: str
    levels: tuple[dict[str, Any], ...]  # field changes; levels[0] == {}

    def label(self, level: int) -> str:
        changes = self.levels[level]
        if not changes:
            return "default"
        if list(changes) == [self.name]:
            return f"{self.name}={_short(changes[self.name])}"
        return f"{self.name}(" + ", ".join(f"{k.removeprefix('token_')}={_short(v)}" for k, v in changes.items()) + ")"


def _short(v: Any) -> str:
    if isinstance(v, tuple):
        if len(v) == 2 and v[0] == v[1] and v[0] > 16:  # a square resolution
            return str(v[0])
        if len(v) > 4 and v == tuple(range(len(v))):
            return "all"
        return "(" + ",".join(map(str, v)) + ")"
    return str(v)


@dataclass(frozen=True)
class SearchSpace:
    """Knobs and levels, already expanded to concrete ``ExecConfig`` changes for one model."""

    knobs: tuple[Knob, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(k.levels) for k in self.knobs)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def config(self, point: Sequence[int]) -> ExecConfig:
        """The config at one level per knob."""
        changes: dict[str, Any] = {}
        for knob, level in zip(self.knobs, point, strict=True):
            changes.update(knob.levels[level])
        return ExecConfig(**changes)

    def points(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(n) for n in self.shape))

    def describe(self, point: Sequence[int]) -> str:
        parts = [k.label(lv) for k, lv in zip(self.knobs, point, strict=True) if lv]
        return "; ".join(parts) or "default"

    def to_json(self) -> dict[str, Any]:
        return {k.name: [_jsonable(lv) for lv in k.levels] for k in self.knobs}


def _jsonable(changes: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}


def _expand_level(knob: str, level: Any, space: Space, block_order: dict[str, list[int]]) -> dict[str, Any]:
    if isinstance(level, dict):
        changes = dict(level)
    elif knob in ExecConfig.__dataclass_fields__:
        changes = {knob: level}
    else:
        raise ConfigError(f"knob {knob!r} is not an ExecConfig field; give its levels as dicts of field changes")
    for name in _SKIPS:
        v = changes.get(name)
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v <= space.num_blocks:
                raise ConfigError(f"{knob}: {name}={v} is outside 0..{space.num_blocks}")
            order = block_order.get(name) or list(range(space.num_blocks - 1, -1, -1))
            changes[name] = tuple(sorted(order[:v]))
    if changes.get("token_layers") == "all":
        changes["token_layers"] = tuple(range(space.num_blocks))
    if "resolution" in changes and changes["resolution"] is not None:
        r = _level_resolution(changes["resolution"], space)
        changes["resolution"] = None if r == tuple(space.default_resolution) else r
    # drop changes that equal the default, so equal configs get equal keys
    default = ExecConfig()
    try:
        cfg = ExecConfig(**changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"knob {knob!r}, level {level!r}: {e}") from None
    return {k: getattr(cfg, k) for k in changes if getattr(cfg, k) != getattr(default, k)}


def build_space(spec: dict[str, Sequence[Any]], space: Space, block_order: dict[str, list[int]] | None = None,
                ) -> SearchSpace:
    """Expand a knob -> levels mapping against a model's ``Space``; every level is validated alone."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("the search space is empty: give at least one knob with at least two levels")
    block_order = block_order or {}
    knobs: list[Knob] = []
    seen: dict[str, str] = {}
    for name, levels in spec.items():
        if not isinstance(levels, list | tuple) or not levels:
            raise ConfigError(f"knob {name!r} has no levels (give a non-empty list)")
        expanded = [_expand_level(name, lv, space, block_order) for lv in levels]
        if expanded[0]:
            expanded.insert(0, {})  # level 0 is always the default
        unique: list[dict[str, Any]] = []
        for ch in expanded:
            if ch not in unique:
                unique.append(ch)
        for ch in unique:
            try:
                resolve(ExecConfig(**ch), space)
            except ConfigError as e:
                raise ConfigError(f"knob {name!r}: {e}") from None
            for field_name in ch:
                if seen.setdefault(field_name, name) != name:
                    raise ConfigError(f"knobs {seen[field_name]!r} and {name!r} both set {field_name}; "
                                      "merge them into one knob whose levels are dicts")
        if len(unique) > 1:
            knobs.append(Knob(name, tuple(unique)))
    if not knobs:
        raise ConfigError("the search space is empty: every knob has only the default level")
    return SearchSpace(tuple(knobs))


def _level_resolution(r: Any, space: Space) -> tuple[int, int]:
    """A resolution level: (H, W) as given, or an int height that keeps the default aspect ratio
    (a 352x480 CamVid model's level 256 is 256x352, not a square)."""
    if not isinstance(r, int) or isinstance(r, bool):
        return tuple(r)
    h, w = space.default_resolution
    if h == w:
        return r, r
    m = space.size_multiple
    return r, max(m, round(r * w / h / m) * m)


def _resolutions(space: Space, scales: Sequence[float]) -> list[int]:
    h = space.default_resolution[0]
    m = space.size_multiple
    return sorted({max(m, round(h * s / m) * m) for s in scales}, reverse=True)


PRESETS = ("default", "small", "precision")


def preset(name: str, space: Space) -> dict[str, list[Any]]:
    """Built-in spaces: ``default`` (per family), ``small`` (a quick look, used by the demo) and
    ``precision`` (``small`` in fp32 and int8: int8 runs on CPU)."""
    fam = space.family
    if name not in PRESETS:
        raise ConfigError(f"unknown space preset {name!r} (choose {', '.join(PRESETS)}, or give a JSON file)")
    if name == "precision":
        return {**preset("small", space), "precision": ["fp32", "int8"]}
    small = name == "small"
    spec: dict[str, list[Any]] = {
        "resolution": _resolutions(space, (1.0, 0.857, 0.714) if small else (1.0, 0.929, 0.857, 0.786, 0.714)),
        "mlp_width": [1.0, 0.85, 0.7] if small else [1.0, 0.9, 0.8, 0.7],
    }
    if space.cls_token:
        merge = [{"token_method": "merge", "token_keep": k, "token_layers": "all"} for k in (0.96, 0.93, 0.9)]
        # ToMe's constant r at every block, alone and after pruning half of it: at DeiT-tiny's 196 patches
        # r = 8, 11, 14 save about 26, 35 and 44 % of the MACs (benchmarks/token_schedules.py)
        per_block = [{"token_method": m, "token_r": r} for m, rs in (("merge", (8, 11, 14)), ("prune+merge", (11, 14)))
                     for r in rs]
        prune = [{"token_method": "prune", "token_keep": k} for k in (0.8, 0.7)]
        thresh = [{"token_method": "prune", "token_threshold": 0.9}]
        # per-image merging above a similarity that falls 0.01 per block (ATM): on DeiT-tiny 0.95, 0.92 and
        # 0.895 save 26, 36 and 45 % of the MACs (mean over 400 photos), the last two the best schedules
        # measured there (benchmarks/token_schedules.py)
        similar = [{"token_method": "merge", "token_threshold": t, "token_threshold_step": 0.01}
                   for t in (0.95, 0.92, 0.895)]
        spec["tokens"] = [{}] + (merge[1:2] + prune[:1] if small else merge + per_block + prune + thresh + similar)
    if not small:
        spec["skip_attn"] = [0, 1, 2]
        spec["skip_mlp"] = [0, 1]
    if space.decoder_width:
        spec["decoder_width"] = [1.0, 0.75, 0.5] if small else [1.0, 0.75, 0.5, 0.25]
        n = space.decoder_branches
        drops = [tuple(b for b in range(n) if b != d) for d in range(n - 1, 0, -1)]
        spec["decoder_branches"] = [None, *([list(drops[0])] if small else [list(d) for d in drops])]
    if fam == "swin" and not small:
        spec.pop("skip_attn")
        spec["skip_blocks"] = [0, 1, 2]
    return spec


def calibrated_block_order(calibration: Any) -> dict[str, list[int]]:
    """Least important blocks first, per skip knob, from a calibration (empty when uncalibrated)."""
    if calibration is None:
        return {}
    kinds = {"skip_blocks": "block", "skip_attn": "attn", "skip_mlp": "mlp"}
    return {k: calibration.block_order(v) for k, v in kinds.items() if v in calibration.block_kl}


def load_space(spec: str | Path | dict[str, Any], space: Space, block_order: dict[str, list[int]] | None = None,
               precisions: Sequence[str] | None = None) -> SearchSpace:
    """A preset name, a JSON file, or a dict -> ``SearchSpace`` for a model with ``space``;
    ``precisions`` (e.g. ``["int8"]``) composes every config with those precisions besides fp32."""
    if isinstance(spec, dict):
        raw = spec
    elif str(spec) in PRESETS:
        raw = preset(str(spec), space)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DynavitError(f"space {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DynavitError(f"space file {path} is not valid JSON: {e}") from None
    if precisions:
        levels = list(dict.fromkeys(["fp32", *raw.get("precision", []), *precisions]))
        raw = {**raw, "precision": levels}
    return build_space(raw, space, block_order)
