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
        sub = _dataclass_of(hints[name])
        if sub is not None and isinstance(value, dict):
            d[name] = build(sub, value, f"{where} [{name}]")
    try:
        return cls(**d)
    except Krea2Error as e:
        raise Krea2Error(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise Krea2Error(f"{where}: {e}") from None
