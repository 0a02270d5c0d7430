"""Helpers for frozen dataclass configs: dict round trip and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, TypeVar

from .errors import PargenError

C = TypeVar("C")


def to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Build `cls` from a dict; unknown keys are an error (a config from another model)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise PargenError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)


def apply_overrides(cfg: C, items: list[str]) -> C:
    """`["width=256", "num_blocks=8"]` -> a copy of `cfg` with those fields (values parsed as JSON)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    kw = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise PargenError(f"bad override {item!r}; fields of {type(cfg).__name__}: {', '.join(sorted(names))}")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        kw[key] = tuple(val) if isinstance(val, list) else val
    return dataclasses.replace(cfg, **kw)


ZERO_MEANS_NONE = ("num_classes", "share_quant_resi")  # integer fields where 0 is a setting, not a missing size


def check(cfg: Any, *multiples: tuple[str, str], zero_ok: tuple[str, ...] = ()) -> None:
    """Validate a model config (called by each config's `__post_init__`, so a bad checkpoint JSON or `--set` fails
    before any layer is built): each field has its annotated type, floats are finite and non-negative, integer
    sizes are positive (0 only where the default is 0, i.e. "derive it" or "off", or in ZERO_MEANS_NONE), tuples
    hold positive integers, and for each (a, b) in `multiples` the attribute a is a multiple of b (properties
    such as VAR's derived width work too)."""
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        bad = None
        if kind == "bool":
            bad = None if isinstance(v, bool) else "true or false"
        elif kind == "str":
            bad = None if isinstance(v, str) else "a string"
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            bad = None if ok else "a finite non-negative number"
        elif kind == "int":
            low = 0 if f.default == 0 or f.name in ZERO_MEANS_NONE + zero_ok else 1
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
            bad = None if ok else ("a non-negative integer" if low == 0 else "a positive integer")
        elif kind.startswith("tuple"):
            ok = isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                    for x in v)
            bad = None if ok else "a non-empty list of positive integers"
        if bad:
            raise PargenError(f"{name}.{f.name} must be {bad}, not {v!r}")
    for a, b in multiples:
        if getattr(cfg, a) % getattr(cfg, b):
            raise PargenError(f"{name}: {a} {getattr(cfg, a)} is not a multiple of {b} {getattr(cfg, b)}")
