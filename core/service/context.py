"""`ServiceContext`: everything the domain functions need, assembled in one place.

The API process and each training worker build one context per process. Tests build their own
(SQLite file, local store, a preloaded tiny model) and pass it in, so nothing is patched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.db import make_engine, make_session_factory
from core.engine.model import BaseModel, ModelCard, load_base_model, load_model_card
from core.service.admin_key import admin_key_hashes
from core.storage import BlobStore, make_blob_store
from core.tuners.preservation import keep_anchor_tokens_in


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: BlobStore
    admin_key_hashes: frozenset[str] = frozenset()
    """sha256 hex of every key accepted as admin (STEER_ADMIN_KEY, or the embedded key file)."""
    _base_model: BaseModel | None = None
    _model_card: ModelCard | None = None
    _model_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _redis: Any = field(default=None, repr=False)
    _redis_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Its own lock: a request asking for Redis never waits behind a model load."""

    def base_model(self) -> BaseModel:
        """The frozen base model of this process, loaded on first use and then shared."""
        if self._base_model is None:
            with self._model_lock:
                if self._base_model is None:
                    s = self.settings
                    self._base_model = load_base_model(
                        s.base_model, device=s.device, dtype=s.dtype, cache_root=s.model_cache_dir
                    )
                    # A process that loads the model may train: its jobs' preservation anchors
                    # are sampled once per base model, here, and kept for the next process too.
                    keep_anchor_tokens_in(s.model_cache_dir / "anchors")
        return self._base_model

    def model_card(self) -> ModelCard:
        """Id, tokenizer, fingerprint and context size of the base model. Read off the model where
        this process holds it; otherwise loaded without the weights, which the distributed API
        process never needs (they would cost it memory, and device memory on a GPU host)."""
        if self._base_model is not None:
            return self._base_model.card()
        with self._model_lock:
            if self._base_model is not None:
                return self._base_model.card()
            if self._model_card is None:
                s = self.settings
                self._model_card = load_model_card(s.base_model, cache_root=s.model_cache_dir)
            return self._model_card

    @property
    def base_model_loaded(self) -> bool:
        return self._base_model is not None

    def redis(self) -> Any:
        """This process's Redis client (a `redis.Redis`; None without STEER_REDIS_URL): one connection
        pool for everything the API asks Redis (quotas, instant-version announcements, the workers'
        list and metrics, erasure announcements), closed with the context. Short timeouts: a Redis
        that stops answering costs a request 2 s, never a hang. (The inference transport keeps its
        own asyncio client, on the event loop it runs in.)"""
        if self.settings.redis_url is None:
            return None
        with self._redis_lock:
            if self._redis is None:
                import redis  # distributed mode only

                self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
            return self._redis

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self.engine.dispose()


def build_context(settings: Settings, *, base_model: BaseModel | None = None) -> ServiceContext:
    """The context for `settings`. Connects lazily: building it never needs the database,
    the store or the model to be up (readiness checks report those)."""
    engine = make_engine(settings.effective_database_url)
    return ServiceContext(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        store=make_blob_store(settings),
        admin_key_hashes=admin_key_hashes(settings),
        _base_model=base_model,
    )
