"""What the API knows of the workers (distributed mode): their heartbeats and published metrics.

The workers announce themselves in Redis (`core/inference/heartbeat.py`); this module reads that
for `GET /v1/admin/workers`, `/readyz` and `/metrics`, through the context's one Redis client;
callers run it off the event loop. Embedded mode has no worker processes: the training executor
and the inference engine run inside the API process.

`/metrics` is the API's own registry and every live worker's exposition in one: each worker's text
is parsed by prometheus_client's own parser and its samples labelled `worker="<id>"`, merged into
the API's families of the same name (one HELP/TYPE per family, as Prometheus expects).
"""

from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.inference.heartbeat import WorkerStatus, list_workers, worker_metrics
from core.service.context import ServiceContext

log = logging.getLogger(__name__)


def live_workers(ctx: ServiceContext, kind: str | None = None) -> list[WorkerStatus]:
    """The live workers (none in embedded mode). Redis errors propagate."""
    client = ctx.redis()
    if client is None:
        return []
    return list_workers(client, ctx.settings.infer_worker_timeout_s, kind)


def metrics_exposition(ctx: ServiceContext, own: CollectorRegistry) -> bytes:
    """The API's own metrics, then every live worker's, each worker sample labelled `worker`.
    Without Redis (or with Redis down: logged), the API's alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(own, _worker_expositions(ctx)))
    return generate_latest(registry)


def _worker_expositions(ctx: ServiceContext) -> dict[str, str]:
    client = ctx.redis()
    if client is None:
        return {}
    try:
        names = [w.id for w in list_workers(client, ctx.settings.infer_worker_timeout_s)]
        return worker_metrics(client, names)
    except redis.RedisError as exc:  # Redis down: the API's own metrics still count
        log.warning("workers' metrics left out: Redis unavailable (%s)", exc)
        return {}


class _Merged:
    """A collector: `own`'s families, with each worker's samples of the same family added."""

    def __init__(self, own: CollectorRegistry, workers: dict[str, str]):
        self.own, self.workers = own, workers

    def collect(self):
        families: dict[str, Metric] = {}
        for family in self.own.collect():
            families[family.name] = family
        for worker, exposition in sorted(self.workers.items()):
            for parsed in text_string_to_metric_families(exposition):
                name = parsed.name
                # The text parser reads a counter's or histogram's `_created` samples as a family of
                # their own: they belong to the family they follow.
                if name.endswith("_created") and name.removesuffix("_created") in families:
                    name = name.removesuffix("_created")
                family = families.setdefault(name, Metric(name, parsed.documentation, parsed.type))
                family.samples += [s._replace(labels={"worker": worker, **s.labels}) for s in parsed.samples]
        return list(families.values())
