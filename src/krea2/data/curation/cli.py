"""`krea2 curate`: the krablet table-as-queue from the command line (init, ingest, work, status, map, export)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from krea2.errors import Krea2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Data curation: image table as a job queue.")

DB = typer.Option(None, "--db", envvar="KREA2_CURATION_DB",
                  help="postgresql://... or sqlite:///file (default sqlite:///runs/curation/krea2.sqlite)")


def _options(opts: list[str]) -> dict:
    out = {}
    for o in opts or []:
        if "=" not in o:
            raise Krea2Error(f"bad --opt {o!r}: write it as key=value (e.g. --opt max_aspect=3)")
        k, v = o.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command()
def init(db: str = DB):
    """Create or migrate the image table."""
    from krea2.data.curation.store import open_store, redact

    with open_store(db, migrate=True) as s:
        typer.echo(f"{redact(s.url)}: schema version {s.version()}, {s.count()} images")


@app.command()
def ingest(paths: list[Path] = typer.Argument(..., help="folders, list files (.txt), tar shards, Parquet files"),
           db: str = DB, kind: str = typer.Option("auto", help="auto|folder|list|tar|parquet|file"),
           source: str = typer.Option(None, help="source name for rows without one in their metadata"),
           mirror: Path = typer.Option(None, help="local mirror of the URLs a list file names (MIRROR/host/path)")):
    """Add images to the table (idempotent: a file already there is skipped)."""
    from krea2.data.curation.sources import ingest as run_ingest
    from krea2.data.curation.store import open_store

    with open_store(db, migrate=True) as s:
        stats = run_ingest(s, list(paths), kind=kind, source=source, mirror=mirror, progress=True)
        typer.echo(f"seen {stats.seen}, added {stats.added}, table has {s.count()} images")
    for why in stats.skipped[:20]:
        typer.echo(f"skipped {why}", err=True)


@app.command()
def work(job: str = typer.Argument(..., help="decode|filter|hash|dedup|ocr|caption|rewrite|touch"),
         db: str = DB, batch: int = typer.Option(64, help="rows per claim"),
         workers: int = typer.Option(1, help="worker processes on this machine"),
         lease: float = typer.Option(300.0, help="seconds before a claimed row may be claimed again"),
         drain: bool = typer.Option(False, help="also wait for rows other workers hold, until none is left"),
         opt: list[str] = typer.Option(None, "--opt", help="job option key=value, e.g. ocr=rapidocr, max_aspect=3"),
         quiet: bool = typer.Option(False, help="no progress bar")):
    """Work on one job until nothing is claimable. Start as many as you like, anywhere."""
    from krea2.data.curation.jobs import run_workers

    st = run_workers(db, job, workers=workers, show_progress=not quiet, batch=batch, lease_s=lease, drain=drain,
                     options=_options(opt))
    typer.echo(f"{job}: claimed {st.claimed}, wrote {st.written}, failed attempts {st.failed}")
    for e in st.errors[:3]:
        typer.echo(f"  last error: {e}", err=True)


@app.command()
def run(db: str = DB, batch: int = typer.Option(64), workers: int = typer.Option(1),
        opt: list[str] = typer.Option(None, "--opt", help="job option key=value (all jobs)")):
    """Run every job of the pipeline in DAG order (decode ... rewrite) on this machine."""
    from krea2.data.curation.jobs import PIPELINE, run_workers

    for job in PIPELINE:
        st = run_workers(db, job, workers=workers, batch=batch, options=_options(opt))
        typer.echo(f"{job}: wrote {st.written}, failed attempts {st.failed}")


@app.command("map")
def map_(fn: str = typer.Argument(..., help="module.path:function taking a row dict, returning a JSON-able value"),
         column: str = typer.Option(..., help="result column (created if missing)"),
         where: str = typer.Option("1=1", help="SQL condition selecting the rows, e.g. \"decode_ok = 1\""),
         db: str = DB, batch: int = typer.Option(64), workers: int = typer.Option(4),
         lease: float = typer.Option(300.0)):
    """Run a Python function over a filtered slice of the table with many workers (the notebook `map`)."""
    from krea2.data.curation.jobs import run_workers
    from krea2.data.curation.store import open_store

    with open_store(db) as s:  # a bad filter is one line here, not an error in every worker
        s.check_where(where)
    st = run_workers(db, column, workers=workers, fn=fn, where=where, batch=batch, lease_s=lease)
    typer.echo(f"{column}: wrote {st.written}, failed attempts {st.failed}")


@app.command()
def status(db: str = DB, as_json: bool = typer.Option(False, "--json"),
           prometheus: bool = typer.Option(False, help="print the Prometheus exposition instead")):
    """Pending, failed and done counts per job."""
    from krea2.data.curation.status import format_counts, job_counts, metrics_text
    from krea2.data.curation.store import open_store

    if prometheus:
        typer.echo(metrics_text(db), nl=False)
        return
    with open_store(db) as s:
        counts = job_counts(s)
        typer.echo(json.dumps(counts, indent=1) if as_json else format_counts(counts, s.count()))


@app.command()
def metrics(db: str = DB, port: int = typer.Option(9108)):
    """Serve the queue counts as Prometheus metrics (for autoscaling workers)."""
    from krea2.data.curation.status import serve_metrics

    typer.echo(f"serving krea2_curation_rows on :{port}/metrics")
    serve_metrics(db, port)


@app.command()
def export(out: Path = typer.Option(..., help="output folder (new)"), db: str = DB,
           size: int = typer.Option(64, help="bucket base side in pixels (stage resolution)"),
           batch_size: int = typer.Option(16), seed: int = typer.Option(0),
           drop_last: bool = typer.Option(False, help="drop each bucket's last partial batch")):
    """Write ready rows as pre-shuffled same-bucket Parquet batches plus a manifest."""
    from krea2.data.curation.export import export_rows
    from krea2.data.curation.store import open_store

    with open_store(db) as s:
        m = export_rows(s, out, size=size, batch_size=batch_size, seed=seed, drop_last=drop_last, progress=True)
    typer.echo(f"{m['rows']} rows in {len(m['steps'])} batches -> {out} (buckets {m['buckets']})")


@app.command()
def reset(job: str, db: str = DB, where: str = typer.Option("1=1")):
    """Clear a job's results so it runs again (for example after changing its thresholds)."""
    from krea2.data.curation.store import open_store

    with open_store(db) as s:
        typer.echo(f"reset {s.reset(job, where)} rows of {job}")


@app.command("make-emoji")
def make_emoji(out: Path, size: int = typer.Option(64), limit: int = typer.Option(None)):
    """Write the emoji data set as PNG + JSON sidecars, ready to ingest."""
    from krea2.data.emoji import write_emoji_folder

    typer.echo(f"wrote {write_emoji_folder(out, size, limit)} emoji to {out}")


@app.command("make-world")
def make_world(out: Path, n: int = typer.Option(1000), size: int = typer.Option(64), seed: int = typer.Option(0)):
    """Write world images as PNG + JSON sidecars (scene record, captions), ready to ingest."""
    from krea2.data.curation.sources import write_world_folder

    typer.echo(f"wrote {write_world_folder(out, n, size, seed)} world images to {out}")


def main() -> None:
    import sys

    try:
        app(standalone_mode=False)
    except Krea2Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
