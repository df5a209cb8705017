"""The strict loader: plain mappings -> dataclasses, rejecting unknown keys and mistyped values,
and the checks the sections' ``validate`` share. Every error names the dotted key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from twilbert.errors import TwilbertError


class ConfigError(TwilbertError, ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build ``cls`` from a plain mapping, rejecting unknown keys and mistyped values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown config key(s): {keys} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer past float's range (YAML's 1e999 is already inf)
            value = math.inf
        if not math.isfinite(value):  # a rate, a norm or a timeout of inf passes every `> 0` check
            raise ConfigError(f"{where} must be a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def dig(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"`` in nested mappings; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings -> ``{"model.n_encoders": 12, ...}``: one key per leaf, parts joined by ``sep``
    under ``prefix``."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for JSON model configs and MLflow params)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# Checks shared by the sections' validate()


def check_positive(obj: Any, where: str, *names: str) -> None:
    """Each named value is > 0 (a None of an optional key is left alone)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:  # `not >` also refuses NaN
            raise ConfigError(f"{where}.{name} must be > 0, got {value}")


def check_non_negative(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"{where}.{name} must be >= 0, got {value}")


def check_nonempty(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value.strip():
            raise ConfigError(f"{where}.{name} must not be empty")


def check_delimiter(obj: Any, where: str, name: str) -> None:
    value = getattr(obj, name)
    if len(value) != 1 or value in "\r\n\"":
        raise ConfigError(f"{where}.{name} must be one character other than a quote or line break, got {value!r}")


def check_probability(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{where}.{name} must be in [0, 1), got {value}")

