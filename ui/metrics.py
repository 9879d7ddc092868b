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
        yield self.jobs()
        yield from self.waiting()
        yield self.workers()
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

    def waiting(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tuneq_queue_waiting_jobs", "Jobs waiting to be claimed, per queue.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "tuneq_queue_oldest_waiting_seconds",
            "Age of the oldest waiting job, per queue (absent when none waits).",
            labels=["queue"],
        )
        now = utcnow()
        for wait in stats.queue_waits(self.engine):
            depth.add_metric([wait.queue], wait.waiting)
            age.add_metric([wait.queue], (now - wait.oldest_created_at).total_seconds())
        yield depth
        yield age

    def workers(self) -> Metric:
        family = GaugeMetricFamily(
            "tuneq_live_workers", "Live worker processes listening, per queue and device.",
            labels=["queue", "device"],
        )  # fmt: skip
        counts: dict[tuple[str, str], int] = {}
        for live in live_workers(self.engine, interval_s=self.interval_s):
            for queue in live.worker.queues:
                key = (queue, live.worker.device)
                counts[key] = counts.get(key, 0) + 1
        for (queue, device), count in sorted(counts.items()):
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
            "tuneq_job_duration_seconds", "Seconds from start to end of finished jobs.",
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
