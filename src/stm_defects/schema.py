"""Frozen dataclasses from plain dicts: the one mechanism behind params.yaml and stored configs.

A leaf module: `config` builds `Params` from params.yaml with it, and a registered model version's
stored prediction config is rebuilt with it (`analysis.dispatch.PredictConfig.from_dict`).

`build` checks every value against the field's type hint before the dataclass sees it, so a bad
value fails when the file is loaded, with one line naming the key, and not deep inside an
analysis: ``threshold: high`` where a number is expected gives
``params.yaml:improved.anomaly.threshold: expected a number, not 'high'``. A value check that a
dataclass makes itself (``__post_init__`` raising ``ValueError``) is reported the same way,
prefixed with where the section came from.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from stm_defects.errors import ConfigError


def build(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from ``data``; unknown keys and values of the wrong type raise
    `ConfigError`, lists become tuples."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, not {_shown(data)}")
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
        kwargs[key] = check_value(value, hint, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a required field missing, a dataclass's own check
        raise ConfigError(f"{where}: {err}") from None


def check_value(value, hint, where: str):
    """``value`` if it fits type ``hint``, else `ConfigError` naming ``where`` (the key).

    Understood hints: ``bool``, ``int`` (not a bool), ``float`` (an int or a finite float, not a
    bool), ``str``, ``None``, unions (``float | None``), ``tuple[X, ...]`` and ``tuple[X, Y]``
    (a list or tuple, element by element) and dataclasses (built already, or a mapping). Any
    other hint (``Any``, none) accepts everything.
    """
    why = _mismatch(value, hint)
    if why:
        raise ConfigError(f"{where}: {why}")
    return value


def _mismatch(value, hint) -> str | None:
    """Why ``value`` does not fit ``hint`` (None when it does)."""
    if hint is None or hint is typing.Any:
        return None
    if hint is type(None):
        return None if value is None else f"expected null, not {_shown(value)}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if any(_mismatch(value, m) is None for m in members):
            return None
        return f"expected {_describe(hint)}, not {_shown(value)}"
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return f"expected a list ({_describe(hint)}), not {_shown(value)}"
        if len(args) == 2 and args[1] is Ellipsis:
            elems = [args[0]] * len(value)
        elif args:
            if len(value) != len(args):
                return f"expected a list of {len(args)} values ({_describe(hint)}), not {_shown(value)}"
            elems = list(args)
        else:
            return None
        for i, (v, h) in enumerate(zip(value, elems)):
            why = _mismatch(v, h)
            if why:
                return f"item {i} of {_shown(value)}: {why}"
        return None
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"expected a mapping of keys, not {_shown(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, not {_shown(value)}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected a whole number, not {_shown(value)}"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            extra = ""
            if isinstance(value, str):
                try:
                    float(value)
                    extra = " (YAML reads 1e-5 as text: write 1.0e-5)"
                except ValueError:
                    pass
            return f"expected a number, not {_shown(value)}{extra}"
        return None if math.isfinite(value) else f"expected a finite number, not {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected text, not {_shown(value)}"
    return None


def _describe(hint) -> str:
    """A type hint in words: ``float | None`` -> ``a number or null``."""
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(m) for m in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"items: {_describe(args[0])}"
        return "items: " + ", ".join(_describe(a) for a in args)
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _shown(value) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
