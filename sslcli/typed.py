"""Typed dataclasses from plain nested dicts (YAML): the one coercion used by every config, and the
one guarded YAML reader (`read_yaml_file`, `load_yaml`: size, alias-bomb and depth limits).

`from_dict(cls, data)` builds dataclass `cls`, rejecting unknown keys and values of the wrong
type with a ConfigError that names the dotted key and the closest valid names (exit code 2).
A field typed as a union of dataclasses (e.g. the `method:` section) is resolved by the `name`
value of its mapping. `to_dict` is the inverse (tuples as lists).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sslcli.errors import ConfigError, hint


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 8, 80, 80


def show(value: Any) -> str:
    """repr(value) for an error message, bounded (a hostile value may be huge or deeply nested)."""
    return _REPR.repr(value)


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
                              f"{show(value)}{hint(value, map(str, args)) if isinstance(value, str) else ''}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {show(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {show(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and (isinstance(value, (int, float)) and not isinstance(value, bool)
                        or isinstance(value, str) and _FLOAT.fullmatch(value.strip())):
        try:  # a str: YAML 1.1 reads `1e-3` (no dot) as a string
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite float, got {show(value)}")
        return number
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {show(value)}")


def _is_dataclass_union(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and all(map(dataclasses.is_dataclass, args))


def _select_variant(tp: Any, value: Any, key: str) -> type:
    """The member of a union of dataclasses whose `name` default equals value["name"] (a section
    without `name` takes the first member, e.g. `method:` defaults to DINO)."""
    variants = {v.name: v for v in typing.get_args(tp)}
    if not isinstance(value, dict):
        raise ConfigError(f"config section '{key}' must be a mapping, got {show(value)}")
    name = value.get("name", next(iter(variants)))
    if not isinstance(name, str) or name not in variants:
        raise ConfigError(f"config key '{key}.name' must be one of {', '.join(variants)}, got "
                          f"{show(name)}{hint(str(name), variants) if isinstance(name, str) else ''}")
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


MAX_YAML_BYTES = 1 << 20  # presets are a few KB
MAX_YAML_NODES = 100_000  # values after alias expansion (a "billion laughs" file is tiny but expands hugely)
MAX_YAML_DEPTH = 64  # nesting levels after alias expansion (the loaders and the merge recurse)


class _Refused(Exception):
    """A YAML document over the size or depth limits (load_yaml turns it into a ConfigError)."""


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops past MAX_YAML_NODES nodes or MAX_YAML_DEPTH levels (PyYAML's
    composer recurses: a deep document would otherwise end in a RecursionError)."""

    composed = depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.composed, self.depth = self.composed + 1, self.depth + 1
        try:
            if self.composed > MAX_YAML_NODES:
                raise _Refused(f"has more than {MAX_YAML_NODES} values")
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load(text), refused with a ConfigError naming `where` when it holds more than
    MAX_YAML_NODES values or nests deeper than MAX_YAML_DEPTH levels once its aliases are expanded,
    or when an alias sits inside its own anchor. The node graph is composed and measured before
    anything is constructed, so an alias bomb is never expanded. yaml.YAMLError passes through."""
    loader = _GuardedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node_graph(node)
        return loader.construct_document(node)
    except _Refused as e:
        raise ConfigError(f"{where} is refused: it {e}") from None
    finally:
        loader.dispose()


def _check_node_graph(root: yaml.Node) -> None:
    """Expanded size and height of the node graph, memoised per node (an alias is the very node
    object its anchor names, so a bomb costs one visit per distinct node)."""
    size: dict[int, tuple[int, int]] = {}  # id -> (expanded values, expanded levels)
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_nodes.discard(id(node))
            sub = [size[id(c)] for c in children]
            size[id(node)] = values, levels = 1 + sum(n for n, _ in sub), 1 + max((h for _, h in sub), default=0)
            if values > MAX_YAML_NODES:
                raise _Refused(f"expands to more than {MAX_YAML_NODES} values through its aliases (an alias bomb?)")
            if levels > MAX_YAML_DEPTH:
                raise _Refused(f"nests deeper than {MAX_YAML_DEPTH} levels through its aliases")
        elif id(node) in open_nodes:
            raise _Refused("has an alias inside its own anchor (a recursive structure)")
        elif id(node) not in size:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """The YAML document in `path`; ConfigError (one line naming the file) when it cannot be read, is
    over MAX_YAML_BYTES (checked before reading: a 50 MB file is never read), is not UTF-8 text or
    valid YAML, or is hostile (see load_yaml)."""
    limit = f"the limit is {MAX_YAML_BYTES // 2**20} MiB"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_YAML_BYTES:
                raise ConfigError(f"{what} '{path}' is too large ({size / 2**20:.1f} MiB, {size} bytes; {limit})")
            raw = f.read(MAX_YAML_BYTES + 1)  # a pipe or device reports no size
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} '{path}' is too large (more than {MAX_YAML_BYTES} bytes; {limit})")
    try:
        return load_yaml(raw.decode("utf-8"), f"{what} '{path}'")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {(str(e).splitlines() or [''])[0]}") from None
