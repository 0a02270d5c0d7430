"""Registries: model families (name -> class) and presets (name -> config), as plain dicts.

A family class has a `Config` frozen dataclass and is built as `cls(cfg)`; a preset is a named config of a
family (DiT's `DiT_models` dict, timm's `create_model(name)`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .config import apply_overrides
from .errors import PargenError

FAMILIES: dict[str, type] = {}
PRESETS: dict[str, tuple[str, Any]] = {}


def register_family(name: str):
    """Class decorator: make a model class loadable from checkpoints by its family name."""

    def deco(cls):
        FAMILIES[name] = cls
        cls.family = name
        return cls

    return deco


def register_preset(name: str, family: str, cfg: Any) -> None:
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is registered twice")
    PRESETS[name] = (family, cfg)


def preset_config(name: str, overrides: list[str] | None = None):
    """(family, config) of a preset, with `key=value` overrides applied."""
    _ensure_loaded()
    if name not in PRESETS:
        raise PargenError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    family, cfg = PRESETS[name]
    return family, apply_overrides(cfg, overrides or [])


def create(name: str, **fields):
    """Build the preset `name`, with config fields replaced by keyword."""
    family, cfg = preset_config(name)
    return FAMILIES[family](dataclasses.replace(cfg, **fields))


def build(family: str, cfg) -> Any:
    _ensure_loaded()
    if family not in FAMILIES:
        raise PargenError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family](cfg)


def list_names() -> list[str]:
    _ensure_loaded()
    return sorted(PRESETS)


def _ensure_loaded() -> None:
    from . import models, tokenizers  # noqa: F401  (registration happens on import)
