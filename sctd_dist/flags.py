"""Command-line flags declared on dataclass fields: one declaration per flag.

A field made with `flag(...)` carries its flag name, help text and argparse group next to its
type and default; `add_flags` turns a dataclass's fields into arguments of a parser and
`from_flags` builds the dataclass back from the parsed namespace. A field whose type is itself
a dataclass contributes that dataclass's flags. Booleans are switches: `--name` turns on a field
that defaults to False; a field that defaults to True needs an explicit `--no-...` name. A field
without a default is a required flag; a `list[...]` field takes one or more values.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def flag(default: Any = dataclasses.MISSING, help: str = "", *, name: str | None = None,  # noqa: A002
         aliases: tuple[str, ...] = (), choices: typing.Iterable[Any] | None = None,
         metavar: str | None = None, group: str | None = None,
         default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also the flag `name` (default: `--field-name`); `metavar`
    names its value in the help (default: the flag's name in capitals). Without `default` (and
    `default_factory`) the flag is required."""
    return dataclasses.field(
        default=default, default_factory=default_factory,
        metadata={"flag": name, "aliases": aliases, "help": help, "group": group, "metavar": metavar,
                  "choices": None if choices is None else list(choices)})


def _flag_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every field of `cls` declared with `flag`."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def _value_type(hint: Any) -> Any:
    """`int` for `int | None`, and so on (flags that may be left out default to None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
              group: str | None = None, groups: dict[str, Any] | None = None) -> None:
    """Add one argument per `flag` field of dataclass `cls` (and of its dataclass fields, which
    join the field's group unless they name their own)."""
    groups = {} if groups is None else groups
    for f, hint in _flag_fields(cls):
        kind = _value_type(hint)
        title = f.metadata["group"] or group
        if dataclasses.is_dataclass(kind):
            add_flags(parser, kind, f"{prefix}{f.name}.", title, groups)
            continue
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        names = [f.metadata["flag"] or "--" + f.name.replace("_", "-"), *f.metadata["aliases"]]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "" if default in (None, []) or kind is bool else f" (default: {_shown(default)})"
        options: dict[str, Any] = {"dest": prefix + f.name, "help": f.metadata["help"] + shown}
        if required:
            options["required"] = True
        else:
            options["default"] = default
        if typing.get_origin(kind) is list:  # one or more values of the item type
            kind, options["nargs"] = typing.get_args(kind)[0], "+"
        if kind is bool and default is None:  # unset means "decided elsewhere": --x and --no-x
            options["action"] = argparse.BooleanOptionalAction
        elif kind is bool:
            options["action"] = "store_false" if default else "store_true"
        elif typing.get_origin(kind) is Literal:
            options.update(type=type(default), choices=list(typing.get_args(kind)))
        elif f.metadata["choices"]:
            options.update(type=kind, choices=f.metadata["choices"])
        else:  # named after the flag, not after the (dotted) destination
            options.update(type=_finite_float if kind is float else kind, metavar=f.metadata["metavar"]
                           or names[0].lstrip("-").replace("-", "_").upper())
        groups[title].add_argument(*names, **options)


def _shown(default: Any) -> str:
    """A default as the user would type it (lists space-separated)."""
    if isinstance(default, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return str(default)


def _finite_float(text: str) -> float:
    """argparse type of float flags: "nan" and "inf" parse as floats but mean no setting."""
    value = float(text)  # ValueError: argparse reports "invalid float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_finite_float.__name__ = "float"  # argparse names the type in its messages


def from_flags(cls: type[T], namespace: argparse.Namespace, prefix: str = "") -> T:
    """Build dataclass `cls` from a namespace that `add_flags(parser, cls)` parsed."""
    values = {}
    for f, hint in _flag_fields(cls):
        kind = _value_type(hint)
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_flags(kind, namespace, prefix=f"{prefix}{f.name}.")
        else:
            values[f.name] = getattr(namespace, prefix + f.name)
    return cls(**values)
