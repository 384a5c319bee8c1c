"""Queue counts per job (`krea2 curate status`) and the same counts as a Prometheus gauge for autoscaling."""

from __future__ import annotations

from krea2.data.curation.jobs import JOBS
from krea2.data.curation.store import Store, open_store

STATES = ("pending", "failed", "done", "kept", "rejected", "blocked")


def job_counts(store: Store, jobs: list[str] | None = None) -> dict[str, dict[str, int]]:
    """pending: to do (claimed or not); failed: last attempt failed, will retry; done = kept + rejected;
    blocked: upstream results missing or negative."""
    out = {}
    for job in jobs or store.jobs():
        up = JOBS[job].upstream if job in JOBS else "1=1"
        r = store.execute(
            f"SELECT SUM(CASE WHEN {job} IS NULL AND ({up}) AND {job}_error IS NULL THEN 1 ELSE 0 END) AS pending, "
            f"SUM(CASE WHEN {job} IS NULL AND ({up}) AND {job}_error IS NOT NULL THEN 1 ELSE 0 END) AS failed, "
            f"SUM(CASE WHEN {job} IS NOT NULL THEN 1 ELSE 0 END) AS done, "
            f"SUM(CASE WHEN {job}_ok = 1 THEN 1 ELSE 0 END) AS kept, "
            f"SUM(CASE WHEN {job} IS NOT NULL AND {job}_ok = 0 THEN 1 ELSE 0 END) AS rejected, "
            f"SUM(CASE WHEN {job} IS NOT NULL OR ({up}) THEN 0 ELSE 1 END) AS blocked FROM images")[0]  # NULL-safe
        out[job] = {k: int(r[k] or 0) for k in STATES}
    return out


def format_counts(counts: dict[str, dict[str, int]], total: int) -> str:
    lines = [f"{total} images", f"{'job':<10}" + "".join(f"{s:>10}" for s in STATES)]
    for job, c in counts.items():
        lines.append(f"{job:<10}" + "".join(f"{c[s]:>10}" for s in STATES))
    return "\n".join(lines)


class QueueCollector:
    """Prometheus collector: `krea2_curation_rows{job,state}` read from the table at scrape time."""

    def __init__(self, url: str | None):
        self.url = url

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("krea2_curation_rows", "Rows per curation job and state", labels=["job", "state"])
        with open_store(self.url) as store:
            for job, c in job_counts(store).items():
                for state, n in c.items():
                    g.add_metric([job, state], n)
        yield g


def metrics_text(url: str | None) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(QueueCollector(url))
    return generate_latest(registry).decode()


def serve_metrics(url: str | None, port: int) -> None:
    """Serve /metrics until interrupted (point a Prometheus scrape or KEDA autoscaler at it)."""
    import time

    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(QueueCollector(url))
    start_http_server(port, registry=registry)
    while True:
        time.sleep(3600)
