"""Typed configuration: dataclass schemas, YAML files and `key=value` overrides (STYLE.md 4-6).

A job declares its configuration as a dataclass whose fields are documented by attribute docstrings
(a string literal on the line after the field). This module merges YAML files and command-line
overrides onto that schema with omegaconf, so that every mistake fails at start-up with a message
naming the key and where it came from:

    configs/dit/x.yaml: Key 'lr_' not in 'Optim'. Did you mean: 'lr'? (key: optim.lr_)

and turns the result into an instance of the dataclass. Jobs receive that instance and never see
omegaconf. The same schema renders `ldit <job> --help` (see :func:`describe`).

A YAML file may name files it extends with `_base_: other.yaml` (a path or a list, relative to the
file); bases are merged first, in order.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A configuration mistake, with a message that says where it is and what to change."""


def _first_line(exc: OmegaConfBaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return msg.strip().splitlines()[0]


def _describe_error(source: str, exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    where = f" (key: {key})" if key else ""
    return ConfigError(f"{source}: {_first_line(exc)}{where}")


def load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML file at `path` with its `_base_` files before it, as (source, config) pairs."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: `{BASE_KEY}` files form a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    out: list[tuple[str, DictConfig]] = []
    for base in [bases] if isinstance(bases, str) else bases:
        out += load_yaml_chain(path.parent / base, (*seen, path.resolve()))
    out.append((str(path), OmegaConf.create(data)))
    return out


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"command line: '{item}' is not of the form key=value (e.g. optim.lr=1e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise _describe_error("command line", exc) from None


def load_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Merge YAML `files` (in order) and `key=value` `overrides` onto `schema`; return the dataclass.

    Raises ConfigError naming the file (or "command line") and the key for an unknown key, a value
    of the wrong type, a missing mandatory value, or a violated cross-field rule (the schema's
    optional `validate()` method, which raises ValueError).
    """
    cfg = OmegaConf.structured(schema)
    sources: list[tuple[str, DictConfig]] = []
    for f in files:
        sources += load_yaml_chain(Path(f))
    if overrides:
        sources.append(("command line", _parse_overrides(overrides)))
    for source, part in sources:
        try:
            cfg = OmegaConf.merge(cfg, part)
        except OmegaConfBaseException as exc:
            raise _describe_error(source, exc) from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "?")
        raise ConfigError(
            f"missing required key '{key}': set it in a config file or as {key}=... on the command line"
        ) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, loadable again with :func:`load_config`."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


# ----------------------------------------------------------------------------------------- help


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its bases): {field name: doc}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ", ".join(repr(a) for a in typing.get_args(tp)) + "}"
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        name = getattr(origin, "__name__", str(origin))
        return "optional " + args.replace(", NoneType", "") if name == "Union" else f"{name}[{args}]"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def describe(schema: type, prefix: str = "", defaults: Any = None) -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field of a dataclass schema, in order.

    A nested section's defaults are those of the object its field's default makes (`defaults`), not of
    its class: the demo's `dit` section defaults to the demo's DiT run (4,000 steps), not `ldit train`'s.
    """
    hints = typing.get_type_hints(schema)
    docs = field_docs(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            yield from describe(tp, key + ".", default if dataclasses.is_dataclass(default) else None)  # type: ignore[arg-type]
        else:
            yield key, _type_name(tp), default, docs.get(f.name, "")


def help_text(schema: type, width: int = 100) -> str:
    """The config keys of a schema, one block per key, for `ldit <job> --help`."""
    lines = []
    for key, tp, default, doc in describe(schema):
        shown = "??? (required)" if default == "???" else repr(default)
        lines.append(f"  {key} ({tp}) = {shown}")
        for para in doc.split("\n\n"):  # a docstring's lines are re-flowed: its line breaks are the source's
            if para.strip():
                lines += textwrap.wrap(
                    " ".join(para.split()), width, initial_indent=" " * 6, subsequent_indent=" " * 6
                )
    return "\n".join(lines)
