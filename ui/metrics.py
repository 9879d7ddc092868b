"""``/metrics``: the queue as Prometheus sees it, read from the database at each scrape (so
every replica of the dashboard, and every worker's host, report the same numbers)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from tuneq.schemas.tables import utcnow
from tuneq.worker.store import stats
from tuneq.worker.store.workers import live_workers

# Job durations, seconds: from a minute-long test job to a night's scoring.
DURATION_BUCKETS = (
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
)


class QueueCollector(Collector):  # type: ignore[misc]
    """Jobs by state, the waiting work and its age per queue, live workers, the speed of
    running work, and how long finished jobs took."""

    def __init__(self, engine: Engine, *, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s

    def collect(self) -> Iterator[Metric]:
        processes = self.processes()  # read once per scrape (scrapes may run side by side)
        yield self.jobs()
        yield from self.waiting(processes)
        yield self.workers(processes)
        yield from self.speeds()
        yield self.durations()

    def jobs(self) -> Metric:
        family = GaugeMetricFamily(
            "tuneq_jobs", "Jobs in the database by status, kind and queue.",
            labels=["status", "kind", "queue"],
        )  # fmt: skip
        for status, kind, queue, count in stats.job_counts(self.engine):
            family.add_metric([status, kind, queue], count)
        return family

    def waiting(self, processes: dict[tuple[str, str], int]) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tuneq_queue_waiting_jobs",
            "Jobs waiting to be claimed, per queue (0 for a queue live workers listen on).",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            "tuneq_queue_oldest_waiting_seconds",
            "How long the longest-waiting job of each queue has waited since it was queued "
            "(absent when none waits).",
            labels=["queue"],
        )
        now = utcnow()
        waits = {wait.queue: wait for wait in stats.queue_waits(self.engine)}
        for queue in sorted({*waits, *(q for q, _ in processes)}):
            wait = waits.get(queue)
            depth.add_metric([queue], wait.waiting if wait else 0)
            if wait:
                age.add_metric([queue], (now - wait.oldest_since).total_seconds())
        yield depth
        yield age

    def processes(self) -> dict[tuple[str, str], int]:
        """Live worker processes per (queue, device)."""
        counts: dict[tuple[str, str], int] = {}
        for live in live_workers(self.engine, interval_s=self.interval_s):
            for queue in live.worker.queues:
                key = (queue, live.worker.device)
                counts[key] = counts.get(key, 0) + live.worker.concurrency
        return counts

    def workers(self, processes: dict[tuple[str, str], int]) -> Metric:
        family = GaugeMetricFamily(
            "tuneq_live_workers",
            "Live worker processes (each worker's --concurrency) per queue and device.",
            labels=["queue", "device"],
        )
        for (queue, device), count in sorted(processes.items()):
            family.add_metric([queue, device], count)
        return family

    def speeds(self) -> Iterator[Metric]:
        steps = GaugeMetricFamily(
            "tuneq_training_steps_per_second", "Training speed of running fine-tunes.",
            labels=["job"],
        )  # fmt: skip
        rows = GaugeMetricFamily(
            "tuneq_scoring_rows_per_second", "Speed of running scoring jobs.", labels=["job"]
        )
        for job_id, kind, speed in stats.running_speeds(self.engine):
            if speed is not None:
                (steps if kind == "finetune" else rows).add_metric([job_id], speed)
        yield steps
        yield rows

    def durations(self) -> Metric:
        family = HistogramMetricFamily(
            "tuneq_job_duration_seconds",
            "Seconds from start to end of finished jobs, recounted from the database at each "
            "scrape (a retried job leaves it until it ends again).",
            labels=["kind", "status"],
        )  # fmt: skip
        for durations in stats.finished_durations(self.engine, DURATION_BUCKETS):
            buckets = [(str(b), durations.at_most[b]) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", durations.count))
            family.add_metric(
                [durations.kind, durations.status], buckets, sum_value=durations.total_s
            )
        return family


def metrics_text(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus's text format."""
    return bytes(generate_latest(registry))


def queue_registry(engine: Engine, *, interval_s: float) -> CollectorRegistry:
    """A registry holding only tuneq's queue metrics (not this process's own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(engine, interval_s=interval_s))
    return registry
