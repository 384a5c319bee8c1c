"""`krea2 curate`: the krablet table-as-queue from the command line (init, ingest, work, status, map, export)."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Data curation: image table as a job queue.")
