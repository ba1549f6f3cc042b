"""Typed dataclasses from plain nested dicts (YAML): the one coercion used by every config.

`from_dict(cls, data)` builds dataclass `cls`, rejecting unknown keys and values of the wrong
type with a ConfigError that names the dotted key and the closest valid names (exit code 2).
A field typed as a union of dataclasses (e.g. the `method:` section) is resolved by the `name`
value of its mapping. `to_dict` is the inverse (tuples as lists).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from sslcli.errors import ConfigError, hint


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (e.g. list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, args))}, got "
                              f"{value!r}{hint(str(value), map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _is_dataclass_union(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and all(map(dataclasses.is_dataclass, args))


def _select_variant(tp: Any, value: Any, key: str) -> type:
    """The member of a union of dataclasses whose `name` default equals value["name"] (a section
    without `name` takes the first member, e.g. `method:` defaults to DINO)."""
    variants = {v.name: v for v in typing.get_args(tp)}
    name = value.get("name", next(iter(variants))) if isinstance(value, dict) else None
    if name not in variants:
        raise ConfigError(f"config key '{key}.name' must be one of {', '.join(variants)}, got "
                          f"{name!r}{hint(str(name), variants)}")
    return variants[name]


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", variant_of: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad types raise ConfigError.

    variant_of: for a member of a union, e.g. "method.name simsiam", named in unknown-key errors.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            valid = [f"{prefix}{n}" for n in names]
            where = f" with {variant_of}" if variant_of else ""
            raise ConfigError(f"unknown config key '{dotted}'{where}{hint(dotted, valid)}")
        tp = hints[key]
        if _is_dataclass_union(tp):
            variant = _select_variant(tp, value, dotted)
            kwargs[key] = from_dict(variant, value, f"{dotted}.", variant_of=f"{dotted}.name {variant.name}")
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))
