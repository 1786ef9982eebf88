"""Frozen dataclasses from plain dicts: the one mechanism behind params.yaml and stored configs.

A leaf module: `config` builds `Params` from params.yaml with it, and a registered model version's
stored prediction config is rebuilt with it (`analysis.dispatch.PredictConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
import typing

from stm_defects.errors import ConfigError


def build(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``; unknown keys raise, lists become tuples."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = build(hint, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"{where}: {err}") from None


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
