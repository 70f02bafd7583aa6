"""YAML <-> dataclass mapping with dotted overrides and typo suggestions (in the spirit of EasyR1).

Each config section is a dataclass whose fields are exactly the YAML keys; unknown keys are errors that
name the full dotted key and suggest the closest known one. A key with a fixed set of values is typed
`Literal[...]`, and `check_fields` / `check_value` are the one place such values are checked: on YAML
values as they are read (so the error names e.g. 'datasets[1].data.format') and on sections built in Python.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message names the dotted key."""


def _unknown_key(key: str, prefix: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config dataclass (string annotations evaluated once, then cached)."""
    return typing.get_type_hints(cls)


def _bad_choice(where: str, value: Any, choices: tuple) -> ConfigError:
    by_lower = {str(c).lower(): c for c in choices}  # "TIS" -> 'tis'
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
    hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
    if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
        hint += " (YAML reads unquoted no/yes/off/on as booleans: quote the value)"
    listed = ", ".join(map(repr, choices))
    return ConfigError(f"config key '{where}' must be one of {listed}, got {value!r}{hint}")


def check_value(value: Any, hint: Any, where: str) -> None:
    """Raise ConfigError if `value` (or any value nested in it) is not one of its Literal type's choices."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise _bad_choice(where, value, typing.get_args(hint))
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is not None and len(args) == 1:
            check_value(value, args[0], where)
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            check_value(v, item, f"{where}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_fields(value, f"{where}.")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every Literal-typed field of dataclass `obj`, walking nested sections and list items.

    `prefix` is the section's dotted key ("algorithm."), so errors name the key as it is written in YAML.
    """
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check_value(getattr(obj, f.name), hints[f.name], f"{prefix}{f.name}")


def _coerce_tuple(value: Any, hint: Any, where: str) -> tuple:
    """A YAML list onto `tuple[X, Y]` (that many items) or `tuple[X, ...]`, each item coerced to its type."""
    args = typing.get_args(hint)
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not isinstance(value, list | tuple) or (args and not variadic and len(value) != len(args)):
        types_ = ", ".join(getattr(a, "__name__", str(a)) for a in args)
        shape = f"a list of {len(args)} ({types_})" if args and not variadic else "a list"
        raise ConfigError(f"config key '{where}' must be {shape}, got {value!r}")
    items = [args[0]] * len(value) if variadic else list(args) or [Any] * len(value)
    return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is None:
            return hint()
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if origin is typing.Literal:
        check_value(value, hint, where)
        return value
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or hint is tuple:
        return _coerce_tuple(value, hint, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    wrong_type = hint in (int, float, str, bool) and not isinstance(value, hint)
    if wrong_type or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{where}' must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking every key, type and choice."""
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), prefix, names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid config section '{prefix.rstrip('.') or '<root>'}': {err}") from err


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value`, the value parsed as YAML (so 1e-6, true, [1, 2] and null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(cls: type, data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides onto the raw dict, validating each path against the schema first."""
    for text in overrides:
        path, value = parse_override(text)
        node_cls, node, prefix = cls, data, ""
        for i, part in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in fields:
                raise _unknown_key(part, prefix, list(fields))
            if i == len(path) - 1:
                node[part] = value
                break
            hint = type_hints(node_cls)[part]
            if not dataclasses.is_dataclass(hint):
                raise ConfigError(f"config key '{prefix}{part}' is a value, not a section "
                                  f"(override {text!r})")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            node_cls, prefix = hint, f"{prefix}{part}."
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    data = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(cls, data, overrides or []))
