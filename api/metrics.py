"""Prometheus metrics of the API process: job counts by status and queue depth (read from the
database at scrape time, so every API replica reports the same truth), plus the training step
histogram of in-process training (embedded mode)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from core.db import Job
from core.db.models import JOB_STATUSES
from core.service.context import ServiceContext
from core.service.metrics import TRAIN_STEP_SECONDS


class JobsCollector(Collector):
    def __init__(self, ctx: ServiceContext, broker_depth=None) -> None:
        self.ctx = ctx
        self.broker_depth = broker_depth

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        try:
            with self.ctx.session_factory() as session:
                for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                    counts[status] = count
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            return
        jobs = GaugeMetricFamily("steer_jobs", "Training jobs by status.", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("steer_queue_depth", "Training jobs waiting to run.", value=counts["queued"])
        depth = self.broker_depth() if self.broker_depth else None
        if depth is not None:
            yield GaugeMetricFamily(
                "steer_broker_queue_depth", "Messages waiting in the Celery train queue.", value=depth
            )


def make_registry(ctx: ServiceContext, broker_depth=None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobsCollector(ctx, broker_depth))
    registry.register(TRAIN_STEP_SECONDS)
    return registry
