"""Build frozen dataclasses from plain dicts (YAML), strictly: unknown keys, wrong types and
out-of-range values fail with the source, the dotted key path, the value and what is allowed.

Range limits live in field metadata: `field(default=..., metadata={"min": 0, "gt": 0, "max": 1, "lt": 1})`.
"""

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

import yaml

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
        _check_finite_inside(value, source, key)
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
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer beyond any float
            raise KitError(f"{source}: {key}: {_show(value)} is out of range; allowed: a finite number") from None
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise KitError(f"{source}: {key}: expected {hint.__name__}, got {_show(value)}")
    return value


def _check_range(value: Any, field: dataclasses.Field, source: str, key: str) -> Any:
    if value is None or isinstance(value, (str, bool, dict)):
        return value
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and not in_range(item, field.metadata):
            raise KitError(f"{source}: {key}: {_show(value)} is out of range; allowed: {describe_range(field.metadata)}")
    return value


def in_range(number: float, meta: typing.Mapping) -> bool:
    """Whether `number` is finite (NaN and inf pass no comparison a range could make) and within `meta`'s limits: the
    one range rule of recipes, command-line values and API arguments (kit.recipe.ARGUMENTS)."""
    if isinstance(number, float) and not math.isfinite(number):
        return False
    return not (("min" in meta and number < meta["min"]) or ("max" in meta and number > meta["max"])
                or ("gt" in meta and number <= meta["gt"]) or ("lt" in meta and number >= meta["lt"]))


def _check_finite_inside(value: Any, source: str, key: str) -> None:
    """A free-form mapping (model.args) holds finite numbers only: NaN or inf would reach the model's constructor."""
    if isinstance(value, float) and not math.isfinite(value):
        raise KitError(f"{source}: {key}: {_show(value)} is out of range; allowed: a finite number")
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite_inside(item, source, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite_inside(item, source, f"{key}[{i}]")


def describe_range(meta: typing.Mapping) -> str:
    """What a range allows, e.g. 'a finite number > 0 and <= 1'."""
    parts = []
    for name, op in (("gt", ">"), ("min", ">="), ("lt", "<"), ("max", "<=")):
        if name in meta:
            parts.append(f"{op} {meta[name]}")
    return "a finite number" + (" " + " and ".join(parts) if parts else "")


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


YAML_MAX_NODES = 100_000  # values in a recipe once its aliases are expanded (a real recipe has a few hundred)


def safe_yaml(text: str, source: str) -> Any:
    """YAML read with yaml.safe_load's constructors, after counting the values it would build with every alias
    expanded: nested aliases (a "billion laughs") name a few bytes but expand to gigabytes once a recipe is copied,
    validated or saved, so more than YAML_MAX_NODES is one KitError before anything is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        count = _expanded_size(node, {})
        if count > YAML_MAX_NODES:
            raise KitError(f"{source}: its aliases expand to over {YAML_MAX_NODES:,} values (a recipe holds a few "
                           f"hundred): refused before building it")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with its aliases expanded; shared nodes are counted once per use, computed once."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = YAML_MAX_NODES + 1  # a node reached again while being counted is a recursive alias: too large
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, sizes) for item in node.value)
    else:
        size = 1
    sizes[id(node)] = min(size, YAML_MAX_NODES + 1)
    return sizes[id(node)]
