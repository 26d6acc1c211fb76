"""How loosely spelled config values (JSON lists, 2.0 for 2, an int for a square resolution) become
the canonical values ``ExecConfig`` stores, or a ``ConfigError`` naming the field."""

from __future__ import annotations

from typing import Any

from dynavit.errors import DynavitError


class ConfigError(DynavitError, ValueError):
    """A config value the model cannot take: names the field, the value and the legal range."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whole(name: str, v: Any) -> int:
    """``v`` as an int: an int, or a float with no fractional part (JSON may write 2 as 2.0)."""
    if is_int(v) or (isinstance(v, float) and v.is_integer()):
        return int(v)
    raise ConfigError(f"{name}={v!r} must be a whole number")


def int_tuple(name: str, v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if is_int(v):
        return (v,)
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise ConfigError(f"{name}={v!r} is not a list of block indices")
    out = tuple(v)
    if not all(is_int(i) for i in out):
        raise ConfigError(f"{name}={v!r} must contain integers")
    return tuple(sorted(set(out)))


def num_or_tuple(name: str, v: Any, kind: type) -> Any:
    """A number or a list of numbers; ``kind`` int takes whole numbers only, float any number."""
    def one(x: Any) -> Any:
        if not is_number(x):
            raise ConfigError(f"{name}={v!r} must be a number or a list of numbers")
        return whole(name, x) if kind is int else float(x)
    if v is None:
        return None
    if is_number(v) or isinstance(v, (str, bytes, bool, dict)) or not hasattr(v, "__iter__"):
        return one(v)
    return tuple(one(x) for x in tuple(v))


def resolution(res: Any) -> tuple[int, int] | None:
    if res is None:
        return None
    if isinstance(res, (str, bytes, dict, float, bool)) or not (is_int(res) or hasattr(res, "__iter__")):
        raise ConfigError(f"resolution={res!r} must be a positive int or (height, width)")
    out = (res, res) if is_int(res) else tuple(res)
    if len(out) != 2 or not all(is_int(r) and r > 0 for r in out):
        raise ConfigError(f"resolution={res!r} must be a positive int or (height, width)")
    return out
