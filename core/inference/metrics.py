"""Prometheus metrics of serving. Module-level, so every engine in a process reports to one registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_DEPTH = Gauge("steer_inference_queue_depth", "Generation rows waiting to join the running batch.")
BATCH_SIZE = Gauge("steer_inference_batch_size", "Rows in the running batch (last decoding step).")
TIME_TO_FIRST_TOKEN = Histogram(
    "steer_inference_time_to_first_token_seconds",
    "From admission to the engine until the first text of a row is produced.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS = Counter("steer_inference_generated_tokens_total", "Completion tokens generated.")
TOKENS_PER_SECOND = Gauge(
    "steer_inference_tokens_per_second", "Completion tokens per second of the engine, over its last busy second."
)
REQUESTS = Counter("steer_inference_requests_total", "Generation requests finished, by outcome.", ["finish_reason"])
REJECTED = Counter("steer_inference_rejected_total", "Requests refused because the queue was full.")
PREFIX_CACHE_HITS = Counter("steer_prefix_cache_hits_total", "Prefix lookups served from the cache.")
PREFIX_CACHE_MISSES = Counter("steer_prefix_cache_misses_total", "Prefix lookups that loaded from the store.")
PREFIX_CACHE_BYTES = Gauge("steer_prefix_cache_bytes", "Bytes of prefix tensors held by the cache.")
PREFIX_CACHE_ENTRIES = Gauge("steer_prefix_cache_entries", "Prefixes held by the cache.")


ALL = (
    QUEUE_DEPTH,
    BATCH_SIZE,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    TOKENS_PER_SECOND,
    REQUESTS,
    REJECTED,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_MISSES,
    PREFIX_CACHE_BYTES,
    PREFIX_CACHE_ENTRIES,
)


def register_all(registry) -> None:
    """Also expose the serving metrics in `registry` (they live in the default one too)."""
    for metric in ALL:
        try:
            registry.register(metric)
        except ValueError:  # already there
            pass


class PrefixCacheMetrics:
    """`PrefixCache(on_change=...)` hook that mirrors one cache's counters into Prometheus."""

    def __init__(self) -> None:
        self._hits = 0
        self._misses = 0

    def __call__(self, cache) -> None:
        PREFIX_CACHE_HITS.inc(cache.hits - self._hits)
        PREFIX_CACHE_MISSES.inc(cache.misses - self._misses)
        self._hits, self._misses = cache.hits, cache.misses
        PREFIX_CACHE_BYTES.set(cache.bytes)
        PREFIX_CACHE_ENTRIES.set(len(cache))
