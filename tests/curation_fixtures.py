"""Fixtures for the curation tests: a throwaway PostgreSQL server (one per test session) and a store per backend.

Test modules load them with `pytest_plugins = ["curation_fixtures"]`.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PG_SH = ROOT / "scripts" / "pg.sh"
_server: dict = {}


def pg_binaries_present() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


def pg_server_url() -> str:
    """Start one server for this test session (idempotent across modules); stopped at exit."""
    if "url" in _server:
        return _server["url"]
    if not pg_binaries_present():
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    d = tempfile.mkdtemp(prefix="krea2-pg-")
    os.chmod(d, 0o755)
    out = subprocess.run(["bash", str(PG_SH), "start", d], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"scripts/pg.sh start failed: {out.stderr.strip()[-500:]}")
    _server.update(url=out.stdout.strip().splitlines()[-1], dir=d)

    def stop() -> None:
        subprocess.run(["bash", str(PG_SH), "stop", d], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)

    atexit.register(stop)
    return _server["url"]


def fresh_pg_database() -> tuple[str, callable]:
    import psycopg

    url = pg_server_url()
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return url.replace("/krea2?", f"/{name}?"), drop


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """A fresh, migrated curation database on each backend."""
    from krea2.data.curation.store import open_store

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'curation.sqlite'}"
        drop = None
    else:
        url, drop = fresh_pg_database()
    open_store(url, migrate=True).close()
    yield url
    if drop:
        drop()


@pytest.fixture
def store(store_url):
    from krea2.data.curation.store import open_store

    s = open_store(store_url)
    yield s
    s.close()
