"""``conf/`` composed in pure Python: Hydra's defaults list and command-line overrides, without Hydra.

A lent GPU machine has torch but no hydra-core or omegaconf, and nothing can be installed there, so
the device path (scripts/device_check.sh: the GPU tests, the benchmark, the device pipeline) composes
with this. It covers what ``conf/`` uses and nothing more: a primary ``config.yaml`` whose ``defaults``
name group options (``model: tiny``, ``task@tasks.x: name``) and ``_self_``; overrides ``group=option``,
``+group@pkg=option``, ``key.path=value``, ``+key.path=value`` (add) and ``++key.path=value`` (add or
replace), with values in Hydra's grammar (primitives, quoted strings, flow lists and dicts). Anything
else is refused with a ConfigError rather than composed differently. tests/test_plain_compose.py
checks the result equals Hydra's where Hydra is installed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from twilbert.config.runs import RESOLVER, finetune_runs
from twilbert.config.strict import ConfigError, dig

SELF = "_self_"
# params.yaml's finetune_runs, derived by an OmegaConf resolver under Hydra (config/runs.py)
DERIVED_KEY = "finetune_runs"
DERIVED_VALUE = "${" + RESOLVER + ":${tasks},${finetuning.seeds}}"
INT = re.compile(r"[+-]?(0|[1-9](_?[0-9])*)")
FLOAT = re.compile(r"[+-]?((\d(_?\d)*)?\.\d(_?\d)*|\d(_?\d)*\.?)([eE][+-]?\d(_?\d)*)?|[+-]?(inf|nan)", re.IGNORECASE)


class _Loader(yaml.SafeLoader):
    """YAML as OmegaConf reads it: ``1e-3`` is a float (PyYAML's YAML 1.1 resolver says string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


@dataclass
class Default:
    """One entry of a defaults list: ``group@package: option``, or ``_self_`` (group None)."""

    group: Optional[str]
    package: str = ""
    option: str = ""


@dataclass
class Override:
    """One command-line override: ``prefix key=value`` with prefix '', '+' or '++'."""

    text: str
    prefix: str
    key: str
    value: Any


def compose_plain(overrides: Optional[list[str]] = None, config_dir: Union[str, Path] = "conf") -> dict:
    """``config_dir/config.yaml`` composed with ``overrides``: the dict Hydra's compose gives, in pure Python."""
    root = Path(config_dir)
    primary = _load(root / "config.yaml")
    defaults = _defaults(primary.pop("defaults", None), root / "config.yaml")
    parsed = [parse_override(text) for text in overrides or []]
    groups = {p.name for p in root.iterdir() if p.is_dir()}
    keys = []
    for override in parsed:
        if override.key.split("@", 1)[0] in groups:
            _select(defaults, override, root)
        else:
            keys.append(override)

    composed: dict = {}
    for entry in defaults:
        if entry.group is None:
            _merge(composed, copy.deepcopy(primary))
            continue
        path = root / entry.group / f"{entry.option}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (root / entry.group).glob("*.yaml"))
            raise ConfigError(f"{entry.group}={entry.option}: no {path} (options: {', '.join(known)})")
        content = _load(path)
        if "defaults" in content:
            raise ConfigError(f"{path}: a defaults list in a group option is beyond the plain composer; use Hydra")
        _merge(composed, _nest(entry.package, content))
    for override in keys:
        _assign(composed, override)
    if DERIVED_KEY in composed:  # the one interpolation conf/ holds: its resolver, in plain Python
        composed[DERIVED_KEY] = finetune_runs(composed.get("tasks") or {}, dig(composed, "finetuning.seeds"))
    return composed


def parse_override(text: str) -> Override:
    """``[+|++]key=value`` with the value in Hydra's grammar; other override forms are refused."""
    match = re.fullmatch(r"(\+\+|\+)?([\w.@/-]+)=(.*)", text.strip(), re.DOTALL)
    if not match:
        raise ConfigError(f"override {text!r}: the plain composer takes [+|++]key=value (deletions and sweeps "
                          "need Hydra)")
    prefix, key, value = match.groups()
    return Override(text, prefix or "", key, parse_value(value.strip(), text))


def parse_value(text: str, override: str = "") -> Any:
    """One override value: null, true/false, int, float, a quoted string, [a, b], {k: v}, or a bare string."""
    override = override or text
    if "${" in text:
        raise ConfigError(f"override {override!r}: interpolations need Hydra")
    value, rest = _value(text, 0, override)
    if rest != len(text):
        raise ConfigError(f"override {override!r}: cannot read {text[rest:]!r} in the value {text!r}")
    return value


def _value(text: str, i: int, override: str, nested: bool = False) -> tuple[Any, int]:
    """The value starting at ``text[i]`` (spaces skipped), and the index just past it."""
    i = _skip(text, i)
    if i < len(text) and text[i] in "[{":
        close = "]" if text[i] == "[" else "}"
        items: Any = [] if close == "]" else {}
        i = _skip(text, i + 1)
        while i < len(text) and text[i] != close:
            if close == "]":
                item, i = _value(text, i, override, nested=True)
                items.append(item)
            else:
                key, i = _scalar(text, i, ":", override)
                if i >= len(text) or text[i] != ":":
                    raise ConfigError(f"override {override!r}: a dict item needs key: value")
                items[str(key)], i = _value(text, i + 1, override, nested=True)
            i = _skip(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
        if i >= len(text):
            raise ConfigError(f"override {override!r}: unclosed {'[' if close == ']' else '{'}")
        return items, i + 1
    return _scalar(text, i, ",]}" if nested else "", override)


def _scalar(text: str, i: int, stops: str, override: str) -> tuple[Any, int]:
    i = _skip(text, i)
    if i < len(text) and text[i] in "'\"":
        quote, end = text[i], i + 1
        chars = []
        while end < len(text) and text[end] != quote:
            if text[end] == "\\" and end + 1 < len(text) and text[end + 1] in (quote, "\\"):
                end += 1
            chars.append(text[end])
            end += 1
        if end >= len(text):
            raise ConfigError(f"override {override!r}: unclosed quote")
        return "".join(chars), end + 1
    end = i
    while end < len(text) and text[end] not in stops and text[end] not in "[]{}":
        end += 1
    word = text[i:end].strip()
    if re.fullmatch(r"\w+\(.*", word):
        raise ConfigError(f"override {override!r}: functions such as choice() need Hydra")
    if not stops and "," in word:
        raise ConfigError(f"override {override!r}: {word!r} is a sweep (a,b), which needs Hydra's multirun")
    return _primitive(word), end


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _primitive(word: str) -> Any:
    lowered = word.lower()
    if lowered == "null":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if INT.fullmatch(word):
        return int(word.replace("_", ""))
    if FLOAT.fullmatch(word):
        return float(word.replace("_", ""))
    return word


def _load(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if re.search(r"^#\s*@package", text, re.MULTILINE):
        raise ConfigError(f"{path}: a # @package header is beyond the plain composer; use Hydra")
    text = text.replace(DERIVED_VALUE, "null")  # computed once composed (compose_plain)
    if "${" in text:
        raise ConfigError(f"{path}: interpolations are beyond the plain composer; use Hydra")
    return yaml.load(text, Loader=_Loader) or {}


def _defaults(entries: Any, path: Path) -> list[Default]:
    out = []
    for entry in entries or []:
        if entry == SELF:
            out.append(Default(None))
        elif isinstance(entry, dict) and len(entry) == 1:
            (key, option), = entry.items()
            group, _, package = str(key).partition("@")
            out.append(Default(group, package or group, str(option)))
        else:
            raise ConfigError(f"{path}: defaults entry {entry!r} is beyond the plain composer; use Hydra")
    if not any(d.group is None for d in out):
        out.insert(0, Default(None))  # Hydra >= 1.1 without _self_: the primary config first
    return out


def _select(defaults: list[Default], override: Override, root: Path) -> None:
    """``group=option`` replaces that group's entry; ``+group@pkg=option`` appends one."""
    group, _, package = override.key.partition("@")
    package = package or group
    if not isinstance(override.value, str):
        raise ConfigError(f"override {override.text!r}: {group} takes an option name from {root / group}")
    existing = [d for d in defaults if d.group == group and d.package == package]
    if override.prefix == "+":
        if existing:
            raise ConfigError(f"override {override.text!r}: {group}@{package} is already in the defaults list")
        defaults.append(Default(group, package, override.value))
    elif existing:
        existing[0].option = override.value
    else:
        raise ConfigError(f"override {override.text!r}: no {override.key} in the defaults list (add it with +)")


def _nest(package: str, content: dict) -> dict:
    if package == "_global_":
        return content
    for part in reversed(package.split(".")):
        content = {part: content}
    return content


def _merge(into: dict, other: dict) -> None:
    """OmegaConf's merge of plain configs: mappings merge key by key, anything else is replaced."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _assign(tree: dict, override: Override) -> None:
    *parents, leaf = override.key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            if override.prefix and part not in node:
                node[part] = {}
            else:
                _unknown(tree, override.key)
        node = node[part]
    if override.prefix == "" and leaf not in node:
        _unknown(tree, override.key)
    if override.prefix == "+" and leaf in node:
        raise ConfigError(f"override {override.text!r}: {override.key} is already set (++ replaces it)")
    node[leaf] = override.value


def _unknown(tree: dict, key: str) -> None:
    """The message ``compose`` gives for a key Hydra cannot override (and load_config for params.yaml)."""
    section = dig(tree, key.rsplit(".", 1)[0]) if "." in key else None
    known = f" (known: {', '.join(sorted(section))})" if isinstance(section, dict) else ""
    raise ConfigError(f"unknown config key(s): {key}{known}")
