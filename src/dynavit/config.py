"""``ExecConfig``: one point in a model's space of execution paths, and ``Space``: the legal points.

A config is data: frozen, hashable (so plans and measurements can be cached by it), and
JSON round-trips. It is validated against the ``Space`` of the model it is applied to, and
every bad value is a ``ConfigError`` (a ``ValueError``) naming the field, the value and the
legal range. The default ``ExecConfig()`` is the unmodified model.

Knob semantics (block indices count blocks across all stages, from 0):
- ``skip_blocks`` / ``skip_attn`` / ``skip_mlp``: blocks, attention or MLP sub-layers not run
  (their residual branch is dropped, the skip connection carries the input through).
- ``skip_keep_tokens``: blocks skipped like ``skip_blocks``, except that a block that reduces
  tokens still does: it projects its input's keys (and, where it prunes, the CLS query) and removes
  the tokens the block would have, so every later block sees the token count the path was timed and measured
  with. A deadline's drop in a token path runs this (``dynavit.deadline``).
- ``heads``: heads kept per block (int for all blocks, or one per block): the first ``h``
  heads, which calibration orders by importance.
- ``mlp_width``: fraction of MLP hidden channels kept (float, or one per block).
- ``granularity``: channel counts (MLP, decoder) round UP to a multiple of this, to match a
  vector / tensor-core width. Heads are whole heads (``head_dim`` channels each).
- ``token_keep`` or ``token_r`` at ``token_layers`` (CLS models): after the attention of each
  listed block, keep ``ceil(token_keep * n)`` of the ``n`` patch tokens, or remove a constant
  ``token_r`` (ToMe's r, capped at ``n // 2``; one of the two). ``token_method="prune"`` drops the
  tokens the CLS token attends to least (EViT; ``token_fuse`` folds them into one token);
  ``"merge"`` merges the most similar ones (ToMe bipartite matching, proportional attention);
  ``"prune+merge"`` prunes ``ceil(t / 2)`` of the ``t`` removed, then merges ``t // 2``
  (``dynavit.knobs.tokens.removal``). No ``token_layers``: blocks 3, 6, 9 of 12 (EViT), every block
  for ``token_r`` (ToMe). ``token_threshold`` keeps, per image, as many tokens as the image needs:
  with ``"prune"``, the fewest whose cumulative CLS attention reaches the threshold; with
  ``"merge"`` (at every block), every bipartite pair whose keys' cosine similarity exceeds
  ``token_threshold - i * token_threshold_step`` at block ``i`` (ATM's adaptive merging: deeper
  blocks, whose tokens grow alike, merge at a lower similarity).
- ``resolution``: the input is resized to (H, W) before the patch embedding.
- ``decoder_width`` / ``decoder_branches`` (SegFormer): fraction of decoder channels, and
  which of the four encoder scales feed the decoder.
- ``variant``: which of several loaded models of one family runs.
- ``mux``: images per forward pass of a multiplexed model (ConcatPlexer / Image Multiplexer,
  ``dynavit.multiplex``) attached to the model; 1 is the ordinary model. It cannot exceed the
  N the multiplexed model was trained for, and is not combined with other knobs.
- ``precision``: the arithmetic of the blocks' linear layers (the width-sliced projections and
  MLPs, most of a ViT's MACs): ``"fp32"``; ``"int8"`` (int8 weights per output channel,
  activations quantized at run time, ``dynavit.knobs.quant``); ``"fp16"`` / ``"bf16"`` (where the
  device has the arithmetic). Attention products, norms, convolutions and heads stay fp32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from dynavit.configvalues import ConfigError, int_tuple, is_int, is_number, num_or_tuple, resolution, whole

PRECISIONS = ("fp32", "int8", "fp16", "bf16")  # ExecConfig.precision values; fp32 is the model as loaded
TOKEN_METHODS = ("prune", "merge", "prune+merge")  # ExecConfig.token_method values
SKIP_FIELDS = ("skip_blocks", "skip_attn", "skip_mlp", "skip_keep_tokens")  # block indices: what does not run
THRESHOLD_OPS = {"prune": "threshold", "merge": "merge-similar"}  # token_method -> its per-image token op


@dataclass(frozen=True)
class Space:
    """What one model supports: the legal range of every knob."""

    family: str
    num_blocks: int
    heads: tuple[int, ...]  # heads per block
    head_dim: tuple[int, ...]  # channels per head, per block
    mlp_hidden: tuple[int, ...]  # MLP hidden channels per block
    cls_token: bool = False
    decoder_width: int = 0  # full decoder channels (0: no decoder knobs)
    decoder_branches: int = 0
    size_multiple: int = 1
    default_resolution: tuple[int, int] = (224, 224)
    variants: tuple[str, ...] = ()
    max_mux: int = 1  # images per pass the model was trained to multiplex (1: not multiplexed)
    any_resolution: bool = False  # fully convolutional: the default path runs at the model's input size

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class ExecConfig:
    """One execution path. ``ExecConfig()`` is the unmodified model. See the module docstring.

    Every field and its default is declared here, once; ``__post_init__`` normalises what a
    caller (or JSON) may spell loosely: lists become sorted tuples, ints become floats.
    """

    skip_blocks: tuple[int, ...] = ()
    skip_attn: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()
    skip_keep_tokens: tuple[int, ...] = ()
    heads: int | tuple[int, ...] | None = None
    mlp_width: float | tuple[float, ...] = 1.0
    granularity: int = 1
    token_keep: float = 1.0
    token_r: int = 0
    token_layers: tuple[int, ...] = ()
    token_method: str = "prune"
    token_fuse: bool = False
    token_threshold: float | None = None
    token_threshold_step: float = 0.0
    resolution: tuple[int, int] | None = None
    decoder_width: float = 1.0
    decoder_branches: tuple[int, ...] | None = None
    variant: str | None = None
    mux: int = 1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name, value in _normalised(self).items():
            object.__setattr__(self, name, value)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self, *, only_changed: bool = True) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if only_changed and value == f.default:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExecConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"an ExecConfig must be a JSON object, got {type(d).__name__}")
        return cls(**d)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_json(cls, s: str) -> ExecConfig:
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid ExecConfig JSON: {e}") from None

    def replace(self, **changes: Any) -> ExecConfig:
        return ExecConfig(**{**self.to_dict(only_changed=False), **changes})

    @property
    def is_default(self) -> bool:
        return not self.to_dict()

    def __repr__(self) -> str:
        return f"ExecConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


_generated_init = ExecConfig.__init__


def _checked_init(self: ExecConfig, **kwargs: Any) -> None:
    """The dataclass ``__init__``, with an unknown field a ``ConfigError`` that lists the fields."""
    unknown = sorted(set(kwargs) - set(ExecConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown ExecConfig field {unknown[0]!r} (fields: {', '.join(ExecConfig.field_names())})")
    _generated_init(self, **kwargs)


ExecConfig.__init__ = _checked_init  # type: ignore[method-assign]


def _normalised(cfg: ExecConfig) -> dict[str, Any]:
    """``cfg``'s values in canonical form (so equal paths hash equal), or a ConfigError naming the field."""
    v = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for name in SKIP_FIELDS + ("token_layers",):
        v[name] = int_tuple(name, v[name])
    if v["decoder_branches"] is not None:
        v["decoder_branches"] = int_tuple("decoder_branches", v["decoder_branches"])
    v["heads"] = num_or_tuple("heads", v["heads"], int)
    v["mlp_width"] = num_or_tuple("mlp_width", v["mlp_width"], float)
    for name in ("token_keep", "decoder_width"):
        if not is_number(v[name]):
            raise ConfigError(f"{name}={v[name]!r} must be a number in (0, 1]")
        v[name] = float(v[name])
    if not is_number(v["token_threshold_step"]):
        raise ConfigError(f"token_threshold_step={v['token_threshold_step']!r} must be a number >= 0")
    v["token_threshold_step"] = float(v["token_threshold_step"])
    if v["token_threshold"] is not None and not is_number(v["token_threshold"]):
        raise ConfigError(f"token_threshold={v['token_threshold']!r} must be a number in (0, 1]")
    v["token_threshold"] = None if v["token_threshold"] is None else float(v["token_threshold"])
    if not isinstance(v["token_fuse"], bool):
        raise ConfigError(f"token_fuse={v['token_fuse']!r} must be true or false")
    if v["variant"] is not None and not isinstance(v["variant"], str):
        raise ConfigError(f"variant={v['variant']!r} must be the name of a variant")
    v["resolution"] = resolution(v["resolution"])
    if v["token_method"] not in TOKEN_METHODS:
        raise ConfigError(f"token_method={v['token_method']!r} must be one of {', '.join(TOKEN_METHODS)}")
    v["token_r"] = whole("token_r", v["token_r"])
    if v["token_r"] < 0:
        raise ConfigError(f"token_r={v['token_r']} is outside 0.. (patch tokens removed per block)")
    if not is_int(v["granularity"]) or v["granularity"] < 1:
        raise ConfigError(f"granularity={v['granularity']!r} must be a positive integer")
    if not is_int(v["mux"]) or v["mux"] < 1:
        raise ConfigError(f"mux={v['mux']!r} must be a positive integer (images per forward pass)")
    if v["precision"] not in PRECISIONS:
        raise ConfigError(f"precision={v['precision']!r} must be one of {', '.join(PRECISIONS)}")
    return v


@dataclass(frozen=True)
class BlockPlan:
    """What one block runs under a config (resolved against the Space)."""

    attn: bool
    mlp: bool
    heads: int
    mlp_dim: int
    token_op: str | None = None  # "prune" | "merge" | "prune+merge" | "threshold" | "merge-similar", after attention
    similarity: float = 0.0  # "merge-similar": merge the pairs whose keys' cosine similarity exceeds this
    precision: str = "fp32"  # the block's linear layers (so a prefix computed in fp32 never serves int8)


@dataclass(frozen=True)
class Plan:
    """A config resolved against one model: everything the forward pass reads."""

    config: ExecConfig
    blocks: tuple[BlockPlan, ...]
    token_keep: float = 1.0
    token_r: int = 0
    token_fuse: bool = False
    token_threshold: float | None = None
    resolution: tuple[int, int] | None = None
    decoder_dim: int = 0
    decoder_branches: tuple[int, ...] = ()
    mux: int = 1


def keep_count(total: int, fraction: float, granularity: int = 1) -> int:
    """Channels kept: ceil(fraction * total), rounded up to a multiple of ``granularity``, <= total."""
    k = math.ceil(fraction * total - 1e-9)
    k = -(-k // granularity) * granularity
    return max(1, min(total, k))


def default_token_layers(num_blocks: int) -> tuple[int, ...]:
    """EViT's placement scaled to depth: blocks 3, 6, 9 of 12."""
    return tuple(sorted({max(1, round(num_blocks * i / 4)) for i in (1, 2, 3)}))


def _per_block(name: str, value: Any, n: int) -> tuple:
    if isinstance(value, tuple) and len(value) != n:
        raise ConfigError(f"{name} has {len(value)} values but the model has {n} blocks (give one or {n})")
    return value if isinstance(value, tuple) else (value,) * n


def resolve(cfg: ExecConfig, space: Space) -> Plan:
    """Validate ``cfg`` against ``space`` and compute the per-block plan (no tensors touched)."""
    n = space.num_blocks
    _check_mux(cfg, space)
    heads, widths = _check_blocks(cfg, space)
    _check_tokens(cfg, space)
    _check_decoder(cfg, space)
    token_op = None
    if space.cls_token and _token_change(cfg):
        token_op = cfg.token_method if cfg.token_threshold is None else THRESHOLD_OPS[cfg.token_method]
    every = tuple(range(n)) if cfg.token_r or token_op == "merge-similar" else default_token_layers(n)  # EViT: 3, 6, 9
    layers = set(cfg.token_layers or (every if token_op else ()))
    skip_all, thin = set(cfg.skip_blocks), set(cfg.skip_keep_tokens)  # thin: only the token reduction runs
    blocks = tuple(
        BlockPlan(
            attn=i not in skip_all | thin and i not in cfg.skip_attn,
            mlp=i not in skip_all | thin and i not in cfg.skip_mlp,
            heads=space.heads[i] if heads[i] is None else heads[i],
            mlp_dim=keep_count(space.mlp_hidden[i], widths[i], cfg.granularity),
            token_op=token_op if (i in layers and i not in skip_all and i not in cfg.skip_attn) else None,
            similarity=cfg.token_threshold - i * cfg.token_threshold_step if token_op == "merge-similar" else 0.0,
            precision=cfg.precision,
        )
        for i in range(n)
    )
    return Plan(
        config=cfg, blocks=blocks, token_keep=cfg.token_keep, token_r=cfg.token_r, token_fuse=cfg.token_fuse,
        token_threshold=cfg.token_threshold, resolution=cfg.resolution,
        decoder_dim=keep_count(space.decoder_width, cfg.decoder_width, cfg.granularity) if space.decoder_width else 0,
        decoder_branches=tuple(range(space.decoder_branches)) if cfg.decoder_branches is None
        else cfg.decoder_branches,
        mux=cfg.mux,
    )


def _check_mux(cfg: ExecConfig, space: Space) -> None:
    if cfg.mux == 1:
        return
    if cfg.mux > space.max_mux:
        raise ConfigError(f"mux={cfg.mux} is larger than the {space.max_mux} images per pass this model was trained "
                          "for" if space.max_mux > 1 else f"mux={cfg.mux} needs a multiplexed model; this "
                          f"{space.family} model takes one image per pass")
    if others := sorted(set(cfg.to_dict()) - {"mux"}):
        raise ConfigError(f"mux={cfg.mux} cannot be combined with {others[0]} (multiplexed models run their full "
                          "path only)")


def _check_blocks(cfg: ExecConfig, space: Space) -> tuple[tuple, tuple]:
    """Block indices, heads and MLP widths in range; returns heads and widths per block."""
    n = space.num_blocks
    for name in SKIP_FIELDS + ("token_layers",):
        bad = [i for i in getattr(cfg, name) if not 0 <= i < n]
        if bad:
            raise ConfigError(f"{name} contains block {bad[0]}, outside the model's blocks 0..{n - 1}")
    heads = _per_block("heads", cfg.heads, n)
    widths = _per_block("mlp_width", cfg.mlp_width, n)
    for i, (h, full) in enumerate(zip(heads, space.heads, strict=True)):
        if h is not None and not 1 <= h <= full:
            raise ConfigError(f"heads={h} for block {i} is outside 1..{full} (the block has {full} heads)")
    for i, w in enumerate(widths):
        if not 0.0 < w <= 1.0:
            raise ConfigError(f"mlp_width={w} for block {i} is outside (0, 1]")
    if cfg.resolution is not None:
        h, w = cfg.resolution
        m = space.size_multiple
        if h % m or w % m:
            raise ConfigError(f"resolution={h}x{w} is not a multiple of {m} ({space.family} needs multiples of {m})")
    return heads, widths


def _token_change(cfg: ExecConfig) -> bool:
    return cfg.token_keep < 1.0 or cfg.token_r > 0 or cfg.token_threshold is not None or cfg.token_fuse


def _check_tokens(cfg: ExecConfig, space: Space) -> None:
    if not (_token_change(cfg) or cfg.token_layers or cfg.token_threshold_step):
        return
    if not space.cls_token:
        raise ConfigError(f"token knobs need a CLS-token model; {space.family} has no CLS token")
    if not 0.0 < cfg.token_keep <= 1.0:
        raise ConfigError(f"token_keep={cfg.token_keep} is outside (0, 1]")
    if cfg.token_method != "prune" and cfg.token_keep < 0.5:
        raise ConfigError(f"token_keep={cfg.token_keep} is outside [0.5, 1] for token_method={cfg.token_method!r} "
                          "(bipartite matching merges at most half the tokens per layer)")
    if cfg.token_r and (cfg.token_keep < 1.0 or cfg.token_threshold is not None):
        raise ConfigError(f"token_r={cfg.token_r} cannot be combined with token_keep={cfg.token_keep} or "
                          f"token_threshold={cfg.token_threshold}: give one of them")
    if cfg.token_fuse and cfg.token_method == "prune+merge":
        raise ConfigError("token_fuse=True works with token_method='prune' only, not 'prune+merge'")
    if cfg.token_threshold is not None and not 0.0 < cfg.token_threshold <= 1.0:
        raise ConfigError(f"token_threshold={cfg.token_threshold} is outside (0, 1]")
    if cfg.token_threshold is not None and (cfg.token_method not in THRESHOLD_OPS or cfg.token_fuse):
        raise ConfigError("token_threshold works with token_method='prune' or 'merge' and token_fuse=False only")
    if cfg.token_threshold_step < 0:
        raise ConfigError(f"token_threshold_step={cfg.token_threshold_step} must be >= 0 (a fall per block)")
    if cfg.token_threshold_step and (cfg.token_threshold is None or cfg.token_method != "merge"):
        raise ConfigError(f"token_threshold_step={cfg.token_threshold_step} lowers a merge similarity threshold per "
                          "block: it needs token_method='merge' and a token_threshold")


def _check_decoder(cfg: ExecConfig, space: Space) -> None:
    if cfg.decoder_width == 1.0 and cfg.decoder_branches is None:
        return
    if not space.decoder_width:
        raise ConfigError(f"decoder knobs need a model with a decoder; {space.family} has none")
    if not 0.0 < cfg.decoder_width <= 1.0:
        raise ConfigError(f"decoder_width={cfg.decoder_width} is outside (0, 1]")
    branches = cfg.decoder_branches
    if branches is not None and (not branches or any(not 0 <= b < space.decoder_branches for b in branches)):
        raise ConfigError(f"decoder_branches={list(branches)} must be a non-empty subset of "
                          f"0..{space.decoder_branches - 1}")
