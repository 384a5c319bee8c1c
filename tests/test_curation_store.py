"""The table-as-queue on both backends: schema, idempotent inserts, claims, leases, guarded writes, killed workers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from krea2.data.curation.jobs import run_worker
from krea2.data.curation.store import MIGRATIONS, open_store
from krea2.errors import Krea2Error

pytest_plugins = ["curation_fixtures"]
ROOT = Path(__file__).resolve().parents[1]


def _fill(store, n: int, prefix: str = "r") -> None:
    store.insert_images([{"ref": f"{prefix}{i}", "md5": f"{i:032x}", "source": "test"} for i in range(n)])


def test_migrations_are_versioned_and_idempotent(store):
    assert store.version() == MIGRATIONS[-1][0]
    assert store.migrate() == MIGRATIONS[-1][0]
    cols = store.columns()
    for c in ("decode", "decode_ok", "decode_last_tried_at", "decode_attempts", "decode_claim", "rewrite_writes"):
        assert c in cols
    assert {"decode", "dedup", "caption", "touch"} <= set(store.jobs())


def test_unmigrated_database_is_a_clear_error(tmp_path):
    with pytest.raises(Krea2Error, match="krea2 curate init"):
        open_store(f"sqlite:///{tmp_path / 'empty.sqlite'}")


def test_insert_is_idempotent(store):
    _fill(store, 10)
    assert store.count() == 10
    assert store.insert_images([{"ref": "r3"}, {"ref": "r10"}]) == 1
    assert store.count() == 11


def test_claims_do_not_overlap_and_respect_the_lease(store_url):
    a, b = open_store(store_url), open_store(store_url)
    _fill(a, 10)
    first = a.claim("touch", "1=1", 4, 60, "A")
    second = b.claim("touch", "1=1", 4, 60, "B")
    assert len(first) == 4 and len(second) == 4
    assert not {r["id"] for r in first} & {r["id"] for r in second}
    rest = b.claim("touch", "1=1", 100, 60, "B2")
    assert len(rest) == 2  # leased rows are not handed out again while their lease holds
    assert b.claim("touch", "1=1", 100, 60, "B3") == []
    # An expired lease (lease 0) makes the rows claimable again, oldest attempt first.
    again = b.claim("touch", "1=1", 3, 0.0, "C")
    assert [r["touch_attempts"] for r in again] == [2, 2, 2]
    a.close()
    b.close()


def test_writes_only_under_the_current_claim(store):
    _fill(store, 3)
    rows = store.claim("touch", "1=1", 3, 60, "old")
    stolen = store.claim("touch", "1=1", 1, 0.0, "new")  # lease expired: another worker takes one row
    assert len(stolen) == 1
    n = store.write_results("touch", "old", [(r["id"], True, {"by": "old"}, None) for r in rows])
    assert n == 2  # the stolen row is not overwritten by the stale claim
    assert store.write_results("touch", "new", [(stolen[0]["id"], True, {"by": "new"}, None)]) == 1
    assert store.write_results("touch", "new", [(stolen[0]["id"], True, {"by": "again"}, None)]) == 0
    assert store.execute("SELECT MAX(touch_writes) AS m FROM images")[0]["m"] == 1


def test_failed_attempts_retry_and_are_never_dropped(store_url):
    with open_store(store_url) as s:
        _fill(s, 40)
    stats = run_worker(store_url, "touch", batch=7, lease_s=0.0, options={"fail_p": 0.3}, drain=True, poll_s=0.0)
    assert stats.failed > 0  # some attempts failed ...
    with open_store(store_url) as s:
        assert s.count("touch IS NULL") == 0  # ... and every row got done in the end
        assert s.count("touch_writes = 1") == 40
        assert s.count("touch_attempts > 1") > 0


def test_upstream_predicate_forms_a_dag(store):
    _fill(store, 4)
    assert store.claim("filter", "decode_ok = 1", 10, 60, "t") == []  # nothing decoded yet
    rows = store.claim("decode", "1=1", 10, 60, "t")
    store.write_results("decode", "t", [(r["id"], r["id"] % 2 == 0, {}, None) for r in rows])
    got = store.claim("filter", "decode_ok = 1", 10, 60, "t")
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows if r["id"] % 2 == 0)


def _spawn_worker(url: str, batch: int, lease: float, sleep_s: float) -> subprocess.Popen:
    code = ("import sys; from krea2.data.curation.jobs import run_worker; "
            f"run_worker({url!r}, 'touch', batch={batch}, lease_s={lease}, options={{'sleep_s': {sleep_s}}})")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkilled_workers_lose_nothing_and_never_double_write(store_url):
    n, lease = 500, 1.0
    with open_store(store_url) as s:
        _fill(s, n)
    rng = random.Random(0)
    workers = [_spawn_worker(store_url, 8, lease, 0.01) for _ in range(4)]
    kills, t0 = 0, time.time()
    while time.time() - t0 < 4.0:
        time.sleep(rng.uniform(0.15, 0.4))
        alive = [w for w in workers if w.poll() is None]
        if not alive:
            break
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        workers.remove(victim)
        workers.append(_spawn_worker(store_url, 8, lease, 0.01))
    # Survivors exit when nothing is claimable; rows held by killed workers come back once their lease expires.
    stats = run_worker(store_url, "touch", batch=8, lease_s=lease, drain=True, poll_s=0.1)
    for w in workers:
        w.wait(timeout=60)
        assert w.returncode in (0, -signal.SIGKILL), w.stderr.read().decode()[-2000:]
    assert kills >= 3
    with open_store(store_url) as s:
        assert s.count() == n  # no row lost
        assert s.count("touch IS NULL") == 0  # every row processed
        assert s.count("touch_writes <> 1") == 0  # no result written twice
        assert s.count("touch_attempts > 1") > 0  # and the kills did interrupt claimed work
        # The recorded writer is the holder of the row's final claim.
        for r in s.execute("SELECT touch, touch_claim FROM images"):
            assert r["touch_claim"].startswith(__import__("json").loads(r["touch"])["worker"])
    assert stats.claimed >= 0
