"""Values that must have their declared type: a config read from JSON holds whatever its author
wrote ("128", 4.5, null, NaN), and one wrong value must cost one line naming its key, not a
traceback from deep inside the model."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal


def finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def type_problem(value: Any, kind: Any) -> str | None:
    """What `value` should be to match annotation `kind`, or None when it does (annotations this
    does not know are not checked)."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        args = typing.get_args(kind)
    if typing.get_origin(kind) is Literal:
        return None if value in args else f"one of {list(args)}"
    checks: dict[Any, tuple[Callable[[Any], bool], str]] = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        float: (finite, "a finite number"),
        str: (lambda v: isinstance(v, str), "a string"),
        Path: (lambda v: isinstance(v, (str, Path)), "a path"),
    }
    if kind not in checks:
        return None
    ok, wanted = checks[kind]
    return None if ok(value) else wanted


def _flag_name(f: dataclasses.Field) -> str:
    """The flag of a field declared with `sctd_dist.flags.flag`, else the field's name."""
    if "help" not in f.metadata:
        return f.name
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def check_types(obj: Any, prefix: str = "") -> None:
    """Raise ValueError naming the first field of dataclass `obj` whose value does not have the
    field's type: by its flag when it is one, else `prefix` + its name."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        value = getattr(obj, f.name)
        problem = type_problem(value, hints[f.name])
        if problem:
            name = _flag_name(f)
            raise ValueError(f"{name if name.startswith('--') else prefix + name} must be {problem}, "
                             f"got {value!r}")


def nonfinite_numbers(node: Any, path: str = "") -> list[str]:
    """Dotted keys of every NaN or infinite number in a JSON tree (Python's json accepts NaN and
    Infinity, which no setting means)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in nonfinite_numbers(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in nonfinite_numbers(v, f"{path}[{i}]")]
    return [path] if isinstance(node, float) and not math.isfinite(node) else []
