"""Typed config tables: a TOML table becomes a dataclass, nested tables become nested dataclasses, and an unknown
key is a one-line error listing the known ones (torchtitan's config tree, without a framework)."""

from __future__ import annotations

import dataclasses
import types
import typing

from krea2.errors import Krea2Error


def _dataclass_of(tp) -> type | None:
    """The dataclass inside an annotation such as `IREPAConfig | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def check_type(value, tp) -> bool:
    """Whether a TOML value fits an annotation: bool is not a number, an int is a float, lists/tuples by element."""
    if tp is typing.Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, dict))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(check_type(v, a) for v, a in zip(value, args))
        return all(check_type(v, args[0]) for v in value) if args else True
    if origin is dict:
        k, v = typing.get_args(tp) or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(check_type(a, k) and check_type(b, v) for a, b in value.items())
    return isinstance(value, tp) if isinstance(tp, type) else True


def type_name(tp) -> str:
    """`int`, `float | None`, `tuple[float, float]`, `IREPAConfig | bool | None`: for messages."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return "a table" if dataclasses.is_dataclass(tp) else ("None" if tp is type(None) else tp.__name__)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    return f"{typing.get_origin(tp).__name__}[{', '.join(type_name(a) for a in args)}]" if args else str(tp)


def build(cls, d: dict | None, where: str):
    """`cls(**d)` with nested dataclass fields built from sub-tables; bad keys or values raise Krea2Error.

    `where` names the table in messages, e.g. "recipe.toml: stage 0 (pretrain) [objective]".
    """
    if isinstance(d, cls):
        return d
    if d is not None and not isinstance(d, dict):
        raise Krea2Error(f"{where}: expected a table of settings, got {d!r}")
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise Krea2Error(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if not check_type(value, hints[name]):
            want = type_name(hints[name])
            raise Krea2Error(f"{where}: {name} = {value!r} is not a valid value; expected {want}")
        sub = _dataclass_of(hints[name])
        if sub is not None and isinstance(value, dict):
            d[name] = build(sub, value, f"{where} [{name}]")
    try:
        return cls(**d)
    except Krea2Error as e:
        raise Krea2Error(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise Krea2Error(f"{where}: {e}") from None
