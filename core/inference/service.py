"""Assembling serving for a process: the engine with its prefix cache, and the right `Completer`."""

from __future__ import annotations

from collections.abc import Callable

from core.config import Settings
from core.inference.completer import Completer, InProcessCompleter
from core.inference.engine import InferenceEngine
from core.inference.metrics import PrefixCacheMetrics
from core.inference.prefix_cache import PrefixCache, store_loader
from core.inference.redis_transport import RedisCompleter
from core.model import BaseModel
from core.storage import BlobStore


def build_engine(settings: Settings, base: BaseModel, store: BlobStore) -> InferenceEngine:
    """An engine (not yet started) whose prefixes come from `store`, checked against `base`."""
    cache = PrefixCache(store_loader(store, base), settings.prefix_cache_bytes, on_change=PrefixCacheMetrics())
    return InferenceEngine(base, cache, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)


def build_completer(settings: Settings, load_base: Callable[[], BaseModel], store: BlobStore) -> Completer:
    """Embedded mode: an in-process engine. Distributed mode: jobs go to `steer worker infer` via
    Redis, and the base model is never loaded here (`load_base` is not called)."""
    if settings.redis_url is None:
        return InProcessCompleter(build_engine(settings, load_base(), store))
    return RedisCompleter(settings.redis_url, settings.max_queue)
