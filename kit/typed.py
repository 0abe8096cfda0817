"""Build frozen dataclasses from plain dicts (YAML), strictly: unknown keys, wrong types and
out-of-range values fail with the source, the dotted key path, the value and what is allowed.

Range limits live in field metadata: `field(default=..., metadata={"min": 0, "gt": 0, "max": 1, "lt": 1})`.
"""

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from kit.errors import KitError


def build(cls: type, data: Any, source: str, path: str = "") -> Any:
    """Make a `cls` instance from `data` (a mapping), validating every key and value."""
    where = path or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KitError(f"{source}: {where}: expected a mapping of keys, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise KitError(f"{source}: unknown key '{key}'; valid keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        values[name] = _check_range(convert(hints[name], value, source, key), fields[name], source, key)
    try:
        return cls(**values)
    except KitError:
        raise
    except (TypeError, ValueError) as err:
        raise KitError(f"{source}: {where}: {err}") from None


def convert(hint: Any, value: Any, source: str, key: str) -> Any:
    """Convert one YAML value to the annotated type, or raise a KitError naming what is allowed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, source, key)
    if origin is Literal:
        if value not in args:
            raise KitError(f"{source}: {key}: {_show(value)} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, key)
    if origin is tuple:
        return _convert_tuple(args, value, source, key)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise KitError(f"{source}: {key}: expected a mapping, got {_show(value)}")
        return dict(value)
    return _convert_scalar(hint, value, source, key)


def _convert_tuple(args: tuple, value: Any, source: str, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise KitError(f"{source}: {key}: expected a list, got {_show(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise KitError(f"{source}: {key}: expected a list of {len(args)} values, got {_show(value)}")
    return tuple(convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(hint: type, value: Any, source: str, key: str) -> Any:
    # bool is a subclass of int in Python: refuse `epochs: true` and `flip: 1` explicitly
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise KitError(f"{source}: {key}: expected {hint.__name__}, got {_show(value)}")
    return value


def _check_range(value: Any, field: dataclasses.Field, source: str, key: str) -> Any:
    meta = field.metadata
    if value is None or not meta or isinstance(value, (str, bool, dict)):
        return value
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not isinstance(item, (int, float)):
            continue
        bad = (("min" in meta and item < meta["min"]) or ("max" in meta and item > meta["max"])
               or ("gt" in meta and item <= meta["gt"]) or ("lt" in meta and item >= meta["lt"]))
        if bad:
            raise KitError(f"{source}: {key}: {_show(value)} is out of range; allowed: {_describe(meta)}")
    return value


def _describe(meta: typing.Mapping) -> str:
    parts = []
    for name, op in (("gt", ">"), ("min", ">="), ("lt", "<"), ("max", "<=")):
        if name in meta:
            parts.append(f"{op} {meta[name]}")
    return " and ".join(parts)


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists, ready for YAML or a weights_only checkpoint."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def positive(default: Any) -> Any:
    """A field that must be > 0."""
    return dataclasses.field(default=default, metadata={"gt": 0})


def non_negative(default: Any) -> Any:
    """A field that must be >= 0."""
    return dataclasses.field(default=default, metadata={"min": 0})


def fraction(default: Any, open_ends: bool = True) -> Any:
    """A field in (0, 1) (or [0, 1] with open_ends=False)."""
    meta = {"gt": 0, "lt": 1} if open_ends else {"min": 0, "max": 1}
    return dataclasses.field(default=default, metadata=meta)
