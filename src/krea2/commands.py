"""Registers every sub-command on the `krea2` Typer app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
