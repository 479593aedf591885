"""Typed dataclass configs from YAML: ``load(cls, path, overrides)``.

Every key is checked at load time: an unknown key is an error that lists the
valid ones, a value of the wrong type (or a NaN or infinite number) names its
dotted key, and a missing required key says so. ``--set a.b=value`` overrides
are parsed as YAML scalars (``train.epochs=3``, ``sharding.sharding_types=[table_wise]``).
Every field documents itself in one line (``metadata={"doc": ...}``): ``keys_help(cls)``
lists the keys with their types and defaults for a CLI's ``--help``. ``read`` (the raw
mapping), ``with_presets`` (fill the keys it leaves unset, e.g. a recipe's) and ``build``
are the steps of ``load``, for a loader that presets keys.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import json
import math
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trainer.errors import UserError

T = TypeVar("T")


def load(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read ``path`` (YAML; None = defaults only), apply ``key=value`` overrides, build ``cls``."""
    return build(cls, read(path, overrides), where=str(path or "config"))


def read(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The raw mapping of ``path`` (YAML; None = empty) with the ``key=value`` overrides applied."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        _assign(raw, key.strip().split("."), yaml.safe_load(value) if value else "")
    return raw


def with_presets(raw: dict[str, Any], presets: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with each dotted key of ``presets`` (``"optim.embedding_lr"``) set
    where ``raw`` does not set it: a key given in the file or by ``--set`` wins. An empty
    section (``model:``) is filled like a missing one; a section that is not a mapping is
    left as it is (``build`` names the error)."""
    out = copy.deepcopy(raw)
    for dotted, value in presets.items():
        *sections, key = dotted.split(".")
        node: Any = out
        for section in sections:
            if not isinstance(node, dict):
                break
            if node.get(section) is None:
                node[section] = {}
            node = node[section]
        if isinstance(node, dict) and key not in node:
            node[key] = value
    return out


def _assign(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(keys)}: {k!r} is not a section")
    node[keys[-1]] = value


def build(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types; ``where`` names it in errors."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check (all comparisons are false)
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for ``config.yaml`` in a run directory)."""
    return dataclasses.asdict(config)


# ---- documentation ----------------------------------------------------------------------
# Every field of a config dataclass carries one line of documentation as
# ``field(..., metadata={"doc": "..."})``; ``describe`` lists them for a CLI's --help.


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key, or a section (``is_section``: a nested dataclass, listed before its keys)."""

    key: str  # dotted, e.g. "train.epochs"
    type: str  # e.g. "int", "list of int", "int or null"
    default: str | None  # as YAML would write it; None: required
    doc: str
    is_section: bool = False


def field_doc(f: dataclasses.Field) -> str:
    """A dataclass field's one line of documentation (``metadata={"doc": ...}``); "" without one."""
    return str(f.metadata.get("doc", ""))


def describe(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of config dataclass ``cls`` in declaration order, a section before its keys."""
    hints = typing.get_type_hints(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(KeyDoc(key, "section", None, field_doc(f), is_section=True))
            out += describe(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default: str | None = format_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = format_value(f.default_factory())
        else:
            default = None
        out.append(KeyDoc(key, type_name(tp), default, field_doc(f)))
    return out


def type_name(tp: Any) -> str:
    """A type as a config author reads it: ``tuple[int, ...]`` -> "list of int"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return " | ".join(format_value(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, collections.abc.Mapping):
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """A default as it would be written in YAML or ``--set``: true, null, [16, 16], {}, ""."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value.strip() == value and value and not set(value) & set(",:[]{}#") else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def keys_help(cls: type, width: int = 100) -> str:
    """The keys of ``cls`` for a CLI's help epilog, grouped by section, one key a paragraph:
    ``  train.epochs (int, default 10): how many passes over the train split``."""
    lines: list[str] = []
    keys = describe(cls)
    top = [k for k in keys if not k.is_section and "." not in k.key]  # top-level keys first, before any section
    for k in top + [k for k in keys if k not in top]:
        if k.is_section:
            lines += ["", f"{k.key}: {k.doc}" if k.doc else f"{k.key}:"]
            continue
        head = f"  {k.key} ({k.type}, " + ("required" if k.default is None else f"default {k.default}") + "):"
        lines.append(textwrap.fill(k.doc or "", width, initial_indent=head + " ", subsequent_indent=" " * 6,
                                   break_long_words=False, break_on_hyphens=False) if k.doc else head)  # fmt: skip
    return "\n".join(lines).strip("\n") + "\n"
