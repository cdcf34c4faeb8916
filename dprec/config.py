"""Typed configuration: one dataclass per config, its YAML reader, CLI flags, validation and docs from it.

- ``from_dict(cls, data)`` builds a dataclass from a mapping (YAML, ``--set`` overrides): unknown keys are
  refused by name, every value is checked against the field's annotation (``int``, ``float``, ``bool``,
  ``str``, ``Literal[...]``, ``X | None``, ``tuple[int, ...]``, ``list[str]``, ``dict[str, ...]``, nested
  dataclasses). ``"1e-3"`` becomes a float (YAML 1.1 reads it as a string); ``2.5`` for an ``int`` or
  ``"yes"`` for a ``bool`` is an error naming the key and the expected type. Range checks stay in the
  dataclass's ``__post_init__``.
- ``add_arguments(parser, cls)`` generates one ``--flag`` per field (name, type, choices, default and the
  field's docstring as help); ``from_args(cls, namespace)`` reads them back. Field metadata may rename a flag
  (``field(metadata={"flag": "--text-model"})``) or keep a field off the command line (``{"cli": False}``).
- ``merge`` and ``parse_overrides`` are the one way configs are layered: YAML file, then ``--set a.b=v``.
- ``DPRecError`` is the base of every error that names a user's mistake; ``run_stage`` turns it into one line
  on stderr and exit code 2 (the same for every stage).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import numbers
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class DPRecError(Exception):
    """A mistake in what the user gave (config, data, paths): the stages print its message and exit 2."""


class ConfigError(DPRecError, ValueError):
    """A configuration value or key is wrong; the message names it."""


def run_stage(prog: str, body: Callable[[], int | None]) -> int:
    """Run a stage's ``body``; the user's own mistakes become one ``prog: error: ...`` line and exit code 2."""
    try:
        rc = body()
    except DPRecError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


# ---------------------------------------------------------------------------------------------- type checking


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked (and, where lossless, converted) against the annotation ``hint``."""
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, where)
        raise ConfigError(f"{where}: expected a mapping of {hint.__name__} keys, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_type_name(hint)}), got {value!r}")
        item_hint = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values ({_type_name(hint)}), got {value!r}")
            return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        items = [coerce(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping ({_type_name(hint)}), got {value!r}")
        key_hint, value_hint = args or (Any, Any)
        return {coerce(key_hint, k, f"{where} key"): coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``: unknown keys refused, values checked against the annotations."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {name: coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def check_types(cfg: Any, where: str | None = None) -> None:
    """Check (and losslessly convert) every field of dataclass instance ``cfg`` against its annotation.

    Called first in each config's ``__post_init__``, so a config built in code is held to the same rules
    as one read from YAML or the command line.
    """
    where = where or type(cfg).__name__
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        checked = coerce(hints[f.name], value, f"{where}.{f.name}")
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-able data (tuples become lists, nested dataclasses mappings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


# ---------------------------------------------------------------------------------------------- layering


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``; nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {p} is set to a value and cannot also have keys")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: not a YAML value ({exc})") from exc
    return out


# ---------------------------------------------------------------------------------------------- docs and CLI


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and its bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, prefix: str = "", title: str | None = None) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (``prefix`` before every name unless metadata names a flag).

    Flags default to "not given" so that ``from_args`` uses the dataclass default: the default lives once.
    Types: ``bool`` -> ``--x / --no-x``; ``Literal`` -> choices; ``list``/``tuple`` -> several values; others
    are parsed as YAML scalars and checked by ``from_dict``.
    """
    hints = _hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title) if title else parser
    for f in _cli_fields(cls):
        hint = hints[f.name]
        inner = (
            [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint)
            in (
                Union,
                types.UnionType,
            )
            else [hint]
        )
        base = inner[0] if len(inner) == 1 else hint
        default = _default(f)
        required = default is _MISSING
        shown = "required" if required else f"default: {default!r}"
        help_text = (docs.get(f.name, "").replace("%", "%%") + f" ({shown})").strip()
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": help_text}
        if required:
            kwargs["required"] = True
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(base) in (list, tuple):
            kwargs["nargs"] = "*"
            kwargs["type"] = _yaml_scalar
        elif typing.get_origin(base) is dict or dataclasses.is_dataclass(base):
            continue
        else:
            kwargs["type"] = str if base is str else _yaml_scalar
        group.add_argument(flag_name(f, prefix), **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def args_dict(cls: type, namespace: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (as ``add_arguments`` declared them)."""
    given = vars(namespace)
    return {f.name: given[prefix + f.name] for f in _cli_fields(cls) if prefix + f.name in given}


def from_args(
    cls: type[T],
    namespace: argparse.Namespace,
    prefix: str = "",
    base: dict[str, Any] | None = None,
    where: str = "command line",
) -> T:
    """Dataclass ``cls`` from ``base`` (e.g. YAML) with the flags given on the command line laid over it."""
    return from_dict(cls, merge(base or {}, args_dict(cls, namespace, prefix)), where)
