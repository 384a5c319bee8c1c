"""Jobs and workers: claim a batch, process it, write results under the claim, repeat.

A job is an upstream predicate (what earlier results its rows need: the DAG) and a processor that maps claimed rows
to (id, ok, value, error). Any number of workers, in any number of processes or machines, run the same loop.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import random
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from krea2.data.curation.store import Store, check_name, open_store
from krea2.errors import Krea2Error

Result = tuple[int, bool, object, str | None]  # (id, ok, value, error); error set = failed attempt, retried later
Processor = Callable[[list[dict], Store], list[Result]]


@dataclass
class JobSpec:
    name: str
    upstream: str  # SQL predicate on earlier results
    make: Callable[[dict], Processor]  # options -> processor; built once per worker (models load here)
    lock: str | None = None  # serialise claim+process+write across workers (dedup's grouping needs a global view)
    help: str = ""


def per_row(fn: Callable[[dict], tuple[bool, object]]) -> Processor:
    """Processor from a row function; an exception fails only that row's attempt."""

    def process(rows: list[dict], store: Store) -> list[Result]:
        out = []
        for row in rows:
            try:
                ok, value = fn(row)
                out.append((row["id"], ok, value, None))
            except Exception as e:  # noqa: BLE001 - a failed attempt is recorded and retried, never raised
                out.append((row["id"], False, None, f"{type(e).__name__}: {e}"))
        return out

    return process


def _touch(options: dict) -> Processor:
    sleep_s = float(options.get("sleep_s", 0.0))
    fail_p = float(options.get("fail_p", 0.0))
    me = options.get("worker_id", "")

    def fn(row: dict) -> tuple[bool, object]:
        if sleep_s:
            time.sleep(sleep_s)
        if fail_p and random.random() < fail_p:
            raise RuntimeError("injected failure")
        return True, {"worker": me}

    return per_row(fn)


def _image_job(name: str) -> Callable[[dict], Processor]:
    def make(options: dict) -> Processor:
        from krea2.data.curation import checks

        return per_row(checks.make_row_fn(name, options))

    return make


def _dedup(options: dict) -> Processor:
    from krea2.data.curation.dedup import make_dedup_processor

    return make_dedup_processor(options)


def _caption_job(name: str) -> Callable[[dict], Processor]:
    def make(options: dict) -> Processor:
        from krea2.data.curation import caption

        return caption.make_processor(name, options)

    return make


JOBS: dict[str, JobSpec] = {
    j.name: j
    for j in [
        JobSpec("decode", "1=1", _image_job("decode"), help="open and verify the image; record why it fails"),
        JobSpec("filter", "decode_ok = 1", _image_job("filter"), help="resolution, aspect, Laplacian, entropy, flat"),
        JobSpec("hash", "filter_ok = 1", _image_job("hash"), help="12x12 perceptual hash + colour hash"),
        JobSpec("dedup", "hash_ok = 1", _dedup, lock="krea2-dedup", help="md5 + near-duplicate clusters"),
        JobSpec("ocr", "dedup_ok = 1", _caption_job("ocr"), help="visible text"),
        JobSpec("caption", "ocr_ok = 1", _caption_job("caption"), help="long caption + caption accuracy"),
        JobSpec("rewrite", "caption_ok = 1", _caption_job("rewrite"), help="medium and short rewrites"),
        JobSpec("touch", "1=1", _touch, help="no-op (benchmarks, fault tests)"),
    ]
}
PIPELINE = ("decode", "filter", "hash", "dedup", "ocr", "caption", "rewrite")


def map_spec(fn_path: str, column: str, where: str = "1=1") -> JobSpec:
    """An ad-hoc job: `module:function` over the rows matching `where`, result in `column` (the notebook `map`)."""
    check_name(column)
    if column in JOBS:
        raise Krea2Error(f"map column {column!r} is a built-in job: pick another name")
    fn = load_function(fn_path)

    def make(options: dict) -> Processor:
        def row_fn(row: dict) -> tuple[bool, object]:
            value = fn(row)
            return value is not None and value is not False, value

        return per_row(row_fn)

    return JobSpec(column, where, make, help=f"map {fn_path}")


def load_function(path: str) -> Callable:
    mod, _, name = path.partition(":")
    if not mod or not name:
        raise Krea2Error(f"bad function {path!r}: write it as module.path:function")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise Krea2Error(f"cannot import {path!r}: {e}") from e


def get_spec(job: str, fn: str | None = None, where: str = "1=1") -> JobSpec:
    if fn:
        return map_spec(fn, job, where)
    if job not in JOBS:
        raise Krea2Error(f"unknown job {job!r}: pick one of {', '.join(JOBS)} (or `krea2 curate map` for your own)")
    return JOBS[job]


@dataclass
class WorkerStats:
    claimed: int = 0
    written: int = 0
    failed: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def run_worker(
    url: str | None,
    job: str,
    batch: int = 64,
    lease_s: float = 300.0,
    options: dict | None = None,
    fn: str | None = None,
    where: str = "1=1",
    drain: bool = False,
    poll_s: float = 0.2,
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> WorkerStats:
    """Work on `job` until nothing is claimable (or, with drain, until no row is left to do, leased ones included)."""
    spec = get_spec(job, fn, where)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    options = dict(options or {}, worker_id=worker_id)
    stats = WorkerStats()
    with open_store(url) as store:
        if fn:
            store.ensure_job(spec.name)
        process = spec.make(options)
        while max_batches is None or stats.batches < max_batches:
            token = f"{worker_id}:{stats.batches}"
            if spec.lock:
                with store.transaction(lock=spec.lock):
                    rows = store.claim(spec.name, spec.upstream, batch, lease_s, token)
                    results = process(rows, store) if rows else []
                    written = store.write_results(spec.name, token, results)
            else:
                rows = store.claim(spec.name, spec.upstream, batch, lease_s, token)
                results = process(rows, store) if rows else []
                written = store.write_results(spec.name, token, results)
            if not rows:
                if drain and store.remaining(spec.name, spec.upstream) > 0:
                    time.sleep(poll_s)
                    continue
                break
            stats.batches += 1
            stats.claimed += len(rows)
            stats.written += written
            errs = [r[3] for r in results if r[3] is not None]
            stats.failed += len(errs)
            stats.errors = (stats.errors + errs)[-5:]
            if progress:
                progress(written)
    return stats


def _worker_main(kwargs: dict, queue) -> None:
    try:
        stats = run_worker(**kwargs)
        queue.put(("ok", stats))
    except Krea2Error as e:
        queue.put(("error", str(e)))
    except Exception:  # noqa: BLE001 - hand the trace to the parent, which reports it once
        queue.put(("error", traceback.format_exc(limit=3)))


def run_workers(url: str | None, job: str, workers: int = 1, show_progress: bool = True, **kwargs) -> WorkerStats:
    """Run `workers` worker processes on `job` with a progress bar over the rows still to do."""
    from tqdm import tqdm

    spec = get_spec(job, kwargs.get("fn"), kwargs.get("where", "1=1"))
    with open_store(url) as store:
        if kwargs.get("fn"):
            store.ensure_job(spec.name)
        total = store.remaining(spec.name, spec.upstream)
    bar = tqdm(total=total, desc=f"curate {spec.name}", unit="row", disable=not show_progress)
    if workers <= 1:
        stats = run_worker(url, job, progress=bar.update, **kwargs)
        bar.close()
        return stats
    ctx = mp.get_context("spawn")  # fresh interpreters: no shared DB connections or model state across fork
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(dict(kwargs, url=url, job=job), queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    total_stats, reports, crashes = WorkerStats(), 0, []
    with open_store(url) as store:
        while reports < workers:
            try:
                kind, payload = queue.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty: poll progress, check for dead workers
                left = store.remaining(spec.name, spec.upstream)
                bar.n = max(0, total - left)
                bar.refresh()
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
                continue
            reports += 1
            if kind == "error":
                crashes.append(payload.strip().splitlines()[-1])
                continue
            for k in ("claimed", "written", "failed", "batches"):
                setattr(total_stats, k, getattr(total_stats, k) + getattr(payload, k))
            total_stats.errors += payload.errors
        bar.n = max(0, total - store.remaining(spec.name, spec.upstream))
    bar.close()
    for p in procs:
        p.join()
    if crashes:  # a worker died outside per-row handling (bad options, lost DB): say so once
        raise Krea2Error(f"{len(crashes)} of {workers} workers failed: {crashes[0]}")
    return total_stats
