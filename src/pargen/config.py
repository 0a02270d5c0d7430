"""Helpers for frozen dataclass configs: dict round trip and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
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
