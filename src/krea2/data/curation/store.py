"""The image table and its job columns, on PostgreSQL or SQLite, with the same claim semantics on both.

Every image is a row. Every job JOB is a group of columns: the result `JOB` (JSON text), `JOB_ok` (1 keep / 0 reject,
what later jobs filter on), `JOB_last_tried_at`, `JOB_attempts`, `JOB_claim` (the token of the last claim),
`JOB_error` (last failure) and `JOB_writes` (result writes; must end at 1). A worker claims rows whose result is NULL,
whose upstream results are present and whose last claim is older than the lease, then writes results only while its
claim token still holds: a crashed worker's rows come back after the lease and no result is ever written twice.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from krea2.errors import Krea2Error

DEFAULT_DB = "sqlite:///runs/curation/krea2.sqlite"
DB_ENV = "KREA2_CURATION_DB"

# The release's DAG; a job's predicate is what its rows need from upstream. `touch` is a no-op for benchmarks/tests.
BUILTIN_JOBS = ("decode", "filter", "hash", "dedup", "ocr", "caption", "rewrite", "touch")

BASE_COLUMNS = {
    "ref": "TEXT NOT NULL UNIQUE",  # where the bytes are: a path, tar://SHARD#MEMBER or parquet://FILE#ROW
    "md5": "TEXT",
    "bytes": "BIGINT",
    "format": "TEXT",
    "width": "INTEGER",
    "height": "INTEGER",
    "source": "TEXT",
    "license": "TEXT",
    "meta": "TEXT",  # JSON: sidecar metadata, ground truth of embedded sets, url of a mirrored file
    "ingested_at": "DOUBLE PRECISION",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def job_columns(job: str) -> dict[str, str]:
    return {
        job: "TEXT",
        f"{job}_ok": "INTEGER",
        f"{job}_last_tried_at": "DOUBLE PRECISION",
        f"{job}_attempts": "INTEGER NOT NULL DEFAULT 0",
        f"{job}_claim": "TEXT",
        f"{job}_error": "TEXT",
        f"{job}_writes": "INTEGER NOT NULL DEFAULT 0",
    }


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in BASE_COLUMNS or name == "id":
        raise Krea2Error(f"bad job/column name {name!r}: use lowercase letters, digits and _ (not a base column)")
    return name


def _id_column(backend: str) -> str:
    return "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY" if backend == "postgres" else "INTEGER PRIMARY KEY"


def _migration_1(backend: str) -> list[str]:
    cols = ", ".join(f"{k} {v}" for k, v in BASE_COLUMNS.items())
    return [f"CREATE TABLE images (id {_id_column(backend)}, {cols})", "CREATE INDEX images_md5 ON images (md5)"]


def _migration_2(backend: str) -> list[str]:
    out = []
    for job in BUILTIN_JOBS:
        out += [f"ALTER TABLE images ADD COLUMN {c} {t}" for c, t in job_columns(job).items()]
        # Partial index per pending predicate: claims scan only the rows still to do.
        out.append(f"CREATE INDEX images_{job}_pending ON images ({job}_last_tried_at) WHERE {job} IS NULL")
    return out


# Versioned schema: append, never edit. Each entry is (version, statements for a backend).
MIGRATIONS = [(1, _migration_1), (2, _migration_2)]


@dataclass
class Claim:
    token: str
    rows: list[dict]


def resolve_url(url: str | None) -> str:
    """The database URL to use: postgres(ql)://..., sqlite:///PATH or a plain file path (SQLite).

    Raises Krea2Error for any other scheme (mysql://... would otherwise become an SQLite file named after it)."""
    url = url or os.environ.get(DB_ENV) or DEFAULT_DB
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme and scheme not in ("postgres", "postgresql", "sqlite"):
        raise Krea2Error(f"unsupported database URL scheme {scheme}:// in {redact(url)}; use postgresql://... or "
                         "sqlite:///PATH")
    return url


def redact(url: str) -> str:
    """The URL with any password replaced by ***: never print credentials."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def urlsplit_password(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None


class Store:
    """One connection to the image table. Not thread-safe: one Store per worker process."""

    def __init__(self, url: str | None = None):
        self.url = resolve_url(url)
        self._depth = 0
        self._lock = threading.Lock()
        if self.url.startswith(("postgres://", "postgresql://")):
            self.backend = "postgres"
            try:
                import psycopg
                from psycopg.rows import dict_row
            except ImportError as e:  # pragma: no cover - psycopg is a dependency
                raise Krea2Error("psycopg is missing: pip install 'psycopg[binary]'") from e
            try:
                self.conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row)
            except psycopg.OperationalError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                first = first.replace(self.url, redact(self.url))
                pw = urlsplit_password(self.url)
                if pw:
                    first = first.replace(pw, "***")
                raise Krea2Error(f"cannot connect to {redact(self.url)}: {first} (start one with scripts/pg.sh "
                                 "start)") from None
            self.now = "extract(epoch from clock_timestamp())"
        else:
            self.backend = "sqlite"
            path = self.url.removeprefix("sqlite:///").removeprefix("sqlite://")
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Autocommit; multi-statement work runs inside BEGIN IMMEDIATE, i.e. one writer at a time.
            self.conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA busy_timeout=60000")
            self.now = "((julianday('now') - 2440587.5) * 86400.0)"

    # -- plumbing -----------------------------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.backend == "postgres" else sql

    def execute(self, sql: str, params: Sequence = ()) -> list[dict]:
        cur = self.conn.execute(self._sql(sql), tuple(params))
        if cur.description is None:
            return []
        return [dict(r) for r in cur.fetchall()]

    def execute_count(self, sql: str, params: Sequence = ()) -> int:
        return self.conn.execute(self._sql(sql), tuple(params)).rowcount

    def executemany(self, sql: str, seq: Iterable[Sequence]) -> int:
        seq = [tuple(s) for s in seq]
        if not seq:
            return 0
        if self.backend == "postgres":
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), seq)
                return cur.rowcount
        return self.conn.executemany(sql, seq).rowcount

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[None]:
        """One transaction (nested calls join it). `lock` serialises holders of the same name across workers."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        if self.backend == "postgres":
            with self.conn.transaction():
                if lock:
                    self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
        else:
            self.conn.execute("BEGIN IMMEDIATE")  # SQLite has one writer: the write lock is the named lock too
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self.conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------------------------------------

    def columns(self) -> set[str]:
        if self.backend == "postgres":
            rows = self.execute("SELECT column_name AS name FROM information_schema.columns WHERE table_name='images'"
                                " AND table_schema = current_schema()")
        else:
            rows = self.execute("PRAGMA table_info(images)")
        return {r["name"] for r in rows}

    def version(self) -> int:
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                     "applied_at DOUBLE PRECISION)")
        rows = self.execute("SELECT MAX(version) AS v FROM schema_version")
        return rows[0]["v"] or 0

    def migrate(self) -> int:
        """Apply pending migrations; safe to run from many workers at once. Returns the schema version."""
        with self.transaction(lock="krea2-migrate"):
            current = self.version()
            for version, statements in MIGRATIONS:
                if version > current:
                    for sql in statements(self.backend):
                        self.execute(sql)
                    self.execute(f"INSERT INTO schema_version VALUES (?, {self.now})", (version,))
                    current = version
        return current

    def require_schema(self) -> None:
        latest = MIGRATIONS[-1][0]
        v = self.version()
        if v < latest:
            raise Krea2Error(f"curation table at {redact(self.url)} is at schema {v}, need {latest}: run "
                             "`krea2 curate init`")

    def ensure_job(self, job: str) -> None:
        """Add the columns of an ad-hoc job (`krea2 curate map --column NAME`) if missing."""
        check_name(job)
        have = self.columns()
        missing = {c: t for c, t in job_columns(job).items() if c not in have}
        if not missing:
            return
        with self.transaction(lock="krea2-migrate"):
            have = self.columns()
            for c, t in job_columns(job).items():
                if c not in have:
                    self.execute(f"ALTER TABLE images ADD COLUMN {c} {t}")

    def jobs(self) -> list[str]:
        cols = self.columns()
        return [c[: -len("_last_tried_at")] for c in sorted(cols) if c.endswith("_last_tried_at")]

    # -- rows ---------------------------------------------------------------------------------------------------------

    def insert_images(self, rows: list[dict]) -> int:
        """Insert new images; a `ref` already in the table is skipped, so ingesting twice adds nothing."""
        if not rows:
            return 0
        cols = list(BASE_COLUMNS)
        sql = (f"INSERT INTO images ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
               "ON CONFLICT (ref) DO NOTHING")
        vals = []
        for r in rows:
            r = dict(r, ingested_at=r.get("ingested_at", time.time()))
            if isinstance(r.get("meta"), dict):
                r["meta"] = json.dumps(r["meta"], sort_keys=True)
            vals.append([r.get(c) for c in cols])
        with self.transaction():
            return self.executemany(sql, vals)  # rowcount counts only rows actually inserted

    def count(self, where: str = "1=1", params: Sequence = ()) -> int:
        return self.execute(f"SELECT COUNT(*) AS n FROM images WHERE {where}", params)[0]["n"]

    def claim(self, job: str, upstream: str, k: int, lease_s: float, token: str) -> list[dict]:
        """Claim up to k rows of `job`: result NULL, upstream present, never tried or last tried before the lease."""
        pending = (f"{job} IS NULL AND ({upstream}) AND "
                   f"({job}_last_tried_at IS NULL OR {job}_last_tried_at <= {self.now} - ?)")
        order = f"ORDER BY {job}_last_tried_at NULLS FIRST, id LIMIT ?"
        stamp = f"{job}_last_tried_at = {self.now}, {job}_attempts = {job}_attempts + 1, {job}_claim = ?"
        if self.backend == "postgres":
            sql = (f"WITH picked AS (SELECT id FROM images WHERE {pending} {order} FOR UPDATE SKIP LOCKED) "
                   f"UPDATE images SET {stamp} FROM picked WHERE images.id = picked.id RETURNING images.*")
            params = (lease_s, k, token)
        else:
            # One statement under SQLite's single writer: no two workers can pick the same row.
            sql = f"UPDATE images SET {stamp} WHERE id IN (SELECT id FROM images WHERE {pending} {order}) RETURNING *"
            params = (token, lease_s, k)
        rows = self.execute(sql, params)
        rows.sort(key=lambda r: r["id"])
        return rows

    def write_results(self, job: str, token: str, results: list[tuple[int, bool | None, object, str | None]]) -> int:
        """Write (id, ok, value, error) rows while our claim holds. Returns how many results were written.

        value None with an error records a failed attempt: the result stays NULL and the row retries after the lease.
        """
        done = [(json.dumps(v, sort_keys=True), int(bool(ok)), rid, token) for rid, ok, v, err in results
                if err is None]
        failed = [(err[:2000], rid, token) for rid, ok, v, err in results if err is not None]
        written = 0
        with self.transaction():
            if done:
                # Guarded by the claim token and by `JOB IS NULL`: a worker whose lease expired cannot overwrite.
                sql = (f"UPDATE images SET {job} = ?, {job}_ok = ?, {job}_error = NULL, {job}_writes = {job}_writes + 1"
                       f" WHERE id = ? AND {job}_claim = ? AND {job} IS NULL")
                written = self.executemany(sql, done)  # both drivers sum rowcount over the batch
            if failed:
                self.executemany(f"UPDATE images SET {job}_error = ? WHERE id = ? AND {job}_claim = ?", failed)
        return written

    def remaining(self, job: str, upstream: str) -> int:
        """Rows still to do for `job`, claimed or not."""
        return self.count(f"{job} IS NULL AND ({upstream})")

    def check_where(self, where: str) -> str:
        """A user's SQL row filter, checked against the table before use (one statement, known columns, valid SQL).

        Raises Krea2Error with the database's own reason, e.g. an unknown column."""
        if ";" in where:
            raise Krea2Error(f"--where {where!r}: one SQL condition only (no ';'), e.g. \"decode_ok = 1\"")
        try:
            self.execute(f"SELECT id FROM images WHERE {where} LIMIT 0")
        except Exception as e:  # sqlite3 / psycopg errors (autocommit: nothing to roll back): bad column, syntax, types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise Krea2Error(f"--where {where!r} is not a valid condition on the image table: {first}") from None
        return where

    def reset(self, job: str, where: str = "1=1") -> int:
        """Clear a job's results (and so everything downstream re-runs only where it filters on them)."""
        self.check_where(where)
        cols = job_columns(job)
        sets = ", ".join(f"{c} = NULL" if "DEFAULT 0" not in t else f"{c} = 0" for c, t in cols.items())
        return self.execute_count(f"UPDATE images SET {sets} WHERE {where}")


def open_store(url: str | None = None, migrate: bool = False) -> Store:
    store = Store(url)
    if migrate:
        store.migrate()
    else:
        store.require_schema()
    return store
