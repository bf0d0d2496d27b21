"""Dataclasses ↔ nested dicts and YAML files: type coercion, dotted overrides, renamed keys and values.

Generic: it knows no cryopick setting. A dataclass may declare ``RENAMED_KEYS`` (old key → key) and
``RENAMED_VALUES`` (key → {old value → value}) as ClassVars, so configs written by older versions still load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cryopick.errors import CryopickError


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass ``cls`` from nested ``data``; unknown keys are an error naming the key."""
    data = _renamed(cls, dict(data or {}), where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data.pop(f.name)
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise CryopickError(f"{where}: '{f.name}' must be a mapping, got {value!r}")
            value = from_dict(ftype, value, f"{where}.{f.name}")
        else:
            value = _coerce(value, ftype, f"{where}.{f.name}")
        kwargs[f.name] = value
    if data:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise CryopickError(f"{where}: unknown key(s) {', '.join(sorted(data))} (known: {known})")
    return cls(**kwargs)


def _renamed(cls: type, data: dict, where: str) -> dict:
    """Old key names and old spellings of values (the class's RENAMED_KEYS / RENAMED_VALUES) → current ones."""
    for old, new in getattr(cls, "RENAMED_KEYS", {}).items():
        if old in data:
            if new in data:
                raise CryopickError(f"{where}: give '{new}' or its old name '{old}', not both")
            data[new] = data.pop(old)
    for key, spellings in getattr(cls, "RENAMED_VALUES", {}).items():
        value = data.get(key)
        if isinstance(value, str) and value in spellings:
            data[key] = spellings[value]
    return data


def _coerce(value: Any, ftype: Any, where: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(ftype)
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    if origin in (typing.Union, getattr(types, "UnionType", None)) and len(args) == 1:
        return _coerce(value, args[0], where)
    try:
        return _convert(value, ftype, origin, where)
    except (TypeError, ValueError):
        raise CryopickError(f"{where}: {value!r} is not a valid {getattr(ftype, '__name__', ftype)}") from None


def _convert(value: Any, ftype: Any, origin: Any, where: str) -> Any:
    if ftype is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if ftype in (int, float) and isinstance(value, bool):
        raise ValueError(value)  # YAML's true/false are not 1/0 here: "epochs: true" is a mistake
    if ftype is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if ftype is float:
        return float(value)
    if ftype is str:
        return str(value)
    if origin is list:
        (inner,) = typing.get_args(ftype)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        return [_coerce(v, inner, where) for v in value]
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CryopickError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise CryopickError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise CryopickError(f"{path}: not a text file (a YAML config is expected)") from None
    except yaml.YAMLError as exc:
        raise CryopickError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CryopickError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: dict[str, Any], where: str = "config") -> dict:
    """Set dotted keys (``loss.prior``) in nested ``data`` (read from ``where``); ``None`` values are ignored."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CryopickError(f"{where}: '{key}' must be a mapping, got {node!r}")
        node[leaf] = value
    return out


def deep_merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_yaml(obj: Any) -> str:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return yaml.safe_dump(data, sort_keys=False)
