"""Erasure means erased: no copy of a user's text in the embedded database files (main file, WAL,
shared memory) or the blob directory, and no copy of their prefix in any serving cache.

Real SQLite files on disk, the real in-process training executor and engine, a real Redis for the
distributed-mode cache.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch

from core.inference.erasure import ErasureListener
from core.inference.prefix_cache import PrefixCache, PrefixRef
from tests.support.api import ADMIN, RecordingDispatcher, api_client, bearer, make_settings, onboard, wait_for_job
from tests.support.inference import TestUser, publish_random_prefix


def _files_holding(root: Path, marker: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and marker in p.read_bytes()]


def test_erasure_leaves_no_copy_of_a_users_text_in_the_data_directory(tmp_path: Path):
    marker = f"erase-me-{uuid.uuid4().hex}"
    # One short sample (stored inside a b-tree page), one long enough for overflow pages, and one
    # added later through the samples route; a neighbour's samples must survive.
    samples = [
        f"A short note that carries the marker {marker} and little else of interest.",
        " ".join([f"A long letter about the weather, part {i}, with the marker {marker}." for i in range(100)]),
    ]
    settings = make_settings(tmp_path)
    data_dir = settings.data_dir
    with api_client(settings) as client:  # the real in-process training executor
        keeper = onboard(client, "keeper-2b81")
        leaver = onboard(client, "leaver-5c07", samples)
        user_id = leaver["user"]["id"]
        added = client.post(
            f"/v1/users/{user_id}/samples",
            headers=bearer(leaver["api_key"]),
            json={"samples": [f"Written later, still mine: {marker}."]},
        )
        assert added.status_code == 201, added.text
        assert wait_for_job(client, leaver["job"]["id"])["status"] == "succeeded"
        assert wait_for_job(client, keeper["job"]["id"])["status"] == "succeeded"
        assert _files_holding(data_dir, marker.encode()), "the marker should be on disk before erasure"

        assert client.delete(f"/v1/users/{user_id}", headers=ADMIN).status_code == 200

        assert _files_holding(data_dir, marker.encode()) == []
        assert _files_holding(data_dir, marker.encode("utf-16-le")) == []
        # The neighbour is untouched and the database still works.
        assert client.get(f"/v1/users/{keeper['user']['id']}/samples", headers=ADMIN).json()["data"]
    # After the app closed too (nothing was waiting in a buffer to be written back).
    assert _files_holding(data_dir, marker.encode()) == []


def test_erasure_drops_the_users_prefix_from_the_embedded_serving_cache(tmp_path: Path):
    with api_client(make_settings(tmp_path)) as client:
        ctx = client.app.state.ctx
        body = onboard(client, "cached-4d2e")
        user = TestUser("cached-4d2e", body["user"]["id"], body["api_key"])
        version = publish_random_prefix(ctx, ctx.base_model(), user, seed=5, prefix_len=2)
        answer = client.post(
            "/v1/completions",
            headers=bearer(user.key),
            json={"model": f"user:{user.external_id}", "prompt": "hi", "max_tokens": 1},
        )
        assert answer.status_code == 200, answer.text
        cache = client.app.state.completer.engine.prefixes
        assert (user.user_id, version) in cache
        bytes_before = cache.bytes

        assert client.delete(f"/v1/users/{user.user_id}", headers=ADMIN).status_code == 200

        assert (user.user_id, version) not in cache
        assert cache.bytes < bytes_before


def test_in_distributed_mode_an_erasure_reaches_every_workers_prefix_cache(tmp_path: Path, redis_url: str):
    """The API (distributed mode: Redis completer) erases a user; two workers' prefix caches, each
    following the erasure stream as `steer worker infer` does, drop that user and only that user."""
    import redis

    def load(ref: PrefixRef) -> torch.Tensor:  # stands in for the store read: the cache is real
        return torch.zeros(1, 2, 1, 2, 4)

    settings = make_settings(tmp_path, redis_url=redis_url)
    with api_client(settings, dispatcher=RecordingDispatcher()) as client:
        gone, kept = onboard(client, "erased-7a1c"), onboard(client, "kept-0f3b")
        ids = (gone["user"]["id"], kept["user"]["id"])
        caches = [PrefixCache(load, max_bytes=1 << 20) for _ in range(2)]
        for cache in caches:
            for user_id in ids:
                cache.get(PrefixRef(user_id, 1, f"users/{user_id}/v1.safetensors", "0" * 64))
        listeners = [ErasureListener(redis.Redis.from_url(redis_url), cache, block_ms=100) for cache in caches]
        threads = [listener.start() for listener in listeners]
        try:
            assert all(listener.ready.wait(5) for listener in listeners)
            assert client.delete(f"/v1/users/{ids[0]}", headers=bearer(gone["api_key"])).status_code == 200
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any((ids[0], 1) in cache for cache in caches):
                time.sleep(0.05)
            for cache in caches:
                assert (ids[0], 1) not in cache
                assert (ids[1], 1) in cache
        finally:
            for listener in listeners:
                listener.stop()
            for thread in threads:
                thread.join(5)
