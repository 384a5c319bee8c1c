"""Curation queue throughput: rows/s claimed and processed with 1, 2 and 4 worker processes on PostgreSQL and SQLite.

    .venv/bin/python benchmarks/curation.py [--rows 20000] [--batch 64] [--sleep-ms 0]

`touch` (no-op) measures the queue itself: claim + guarded result write per batch. `decode` measures a real job on
64 px emoji PNGs. Starts its own PostgreSQL with scripts/pg.sh in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from krea2.data.curation.jobs import run_workers  # noqa: E402
from krea2.data.curation.store import open_store  # noqa: E402


def fresh_db(backend: str, tmp: Path, pg_url: str | None) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.sqlite'}"
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return pg_url.replace("/krea2?", f"/{name}?")


def bench(url: str, job: str, rows: list[dict], workers: int, batch: int, options: dict) -> float:
    with open_store(url, migrate=True) as s:
        s.insert_images(rows)
    t = time.perf_counter()
    st = run_workers(url, job, workers=workers, show_progress=False, batch=batch, lease_s=600, options=options)
    dt = time.perf_counter() - t
    assert st.written == len(rows), (st, len(rows))
    return len(rows) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="krea2-bench-"))
    os.chmod(tmp, 0o755)
    pg = subprocess.run(["bash", str(ROOT / "scripts/pg.sh"), "start", str(tmp / "pg")], capture_output=True,
                        text=True)
    pg_url = pg.stdout.strip().splitlines()[-1] if pg.returncode == 0 else None
    from krea2.data.curation.sources import ingest, scan
    from krea2.data.emoji import write_emoji_folder

    write_emoji_folder(tmp / "emoji", 64, limit=args.images)
    image_rows = list(scan(tmp / "emoji"))
    touch_rows = [{"ref": f"row{i}"} for i in range(args.rows)]
    print(f"cpus {os.cpu_count()}, batch {args.batch}; rows/s (claimed and written), wall time incl. worker start")
    print("| backend | job | rows | 1 worker | 2 workers | 4 workers |\n|---|---|---|---|---|---|")
    for backend in ("postgres", "sqlite"):
        if backend == "postgres" and not pg_url:
            print(f"| postgres | skipped: {pg.stderr.strip()[:80]} |")
            continue
        for job, rows in (("touch", touch_rows), ("decode", image_rows)):
            rates = [bench(fresh_db(backend, tmp, pg_url), job, rows, w, args.batch, {}) for w in (1, 2, 4)]
            print(f"| {backend} | {job} | {len(rows)} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |",
                  flush=True)
    del ingest
    subprocess.run(["bash", str(ROOT / "scripts/pg.sh"), "stop", str(tmp / "pg")], capture_output=True)


if __name__ == "__main__":
    main()
