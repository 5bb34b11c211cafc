"""PrefixCache: LRU by bytes (a KV and a LoRA both count), newest version replaces older ones, single
load per key; and what a row carries of its composed versions."""

import threading
import time

import pytest
import torch

from core.engine.adaptation import Adaptation, row_parts
from core.engine.lora import LoRAWeights
from core.errors import CorruptArtifact
from core.inference.prefix_cache import PrefixCache, PrefixRef

KV_BYTES = 2 * 2 * 2 * 4 * 8 * 4  # (L=2, 2, H=2, P=4, D=8) float32


def ref(user: str, version: int = 1) -> PrefixRef:
    return PrefixRef(user, version, f"users/{user}/prefixes/{version}.safetensors", "0" * 64)


class CountingLoader:
    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, int]] = []
        self.delay = delay

    def __call__(self, r: PrefixRef) -> torch.Tensor:
        self.calls.append(r.key)
        time.sleep(self.delay)
        return torch.full((2, 2, 2, 4, 8), float(r.version))


def test_hit_after_miss_loads_once_and_counts():
    loader = CountingLoader()
    cache = PrefixCache(loader, max_bytes=10 * KV_BYTES)
    first = cache.get(ref("a"))
    second = cache.get(ref("a"))
    assert first is second
    assert loader.calls == [("a", 1)]
    assert (cache.hits, cache.misses, cache.bytes) == (1, 1, KV_BYTES)


def test_least_recently_used_prefix_is_evicted_when_bytes_run_out():
    loader = CountingLoader()
    cache = PrefixCache(loader, max_bytes=2 * KV_BYTES)
    cache.get(ref("a"))
    cache.get(ref("b"))
    cache.get(ref("a"))  # a is now more recent than b
    cache.get(ref("c"))
    assert ("a", 1) in cache and ("c", 1) in cache and ("b", 1) not in cache
    assert cache.bytes == 2 * KV_BYTES
    cache.get(ref("b"))
    assert loader.calls.count(("b", 1)) == 2


def test_newer_version_replaces_the_older_one_of_the_same_user():
    cache = PrefixCache(CountingLoader(), max_bytes=10 * KV_BYTES)
    cache.get(ref("a", 1))
    cache.get(ref("b", 1))
    new = cache.get(ref("a", 2))
    assert float(new.flatten()[0]) == 2.0
    assert ("a", 1) not in cache and ("a", 2) in cache and ("b", 1) in cache
    assert cache.bytes == 2 * KV_BYTES


def test_prefix_larger_than_the_budget_is_served_but_not_kept():
    cache = PrefixCache(CountingLoader(), max_bytes=KV_BYTES - 1)
    assert cache.get(ref("a")).shape == (2, 2, 2, 4, 8)
    assert len(cache) == 0 and cache.bytes == 0


def test_loader_errors_propagate_and_are_not_cached():
    calls = []

    def failing(r):
        calls.append(r)
        raise CorruptArtifact("bad bytes")

    cache = PrefixCache(failing, max_bytes=10 * KV_BYTES)
    for _ in range(2):
        with pytest.raises(CorruptArtifact):
            cache.get(ref("a"))
    assert len(calls) == 2 and len(cache) == 0


def test_concurrent_first_requests_share_one_load():
    loader = CountingLoader(delay=0.2)
    cache = PrefixCache(loader, max_bytes=10 * KV_BYTES)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(ref("a")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == [("a", 1)]
    assert all(r is results[0] for r in results)


def test_a_version_of_any_method_counts_its_kv_and_its_lora_bytes():
    q, v = (torch.zeros(2, 8), torch.zeros(8, 2)), (torch.zeros(2, 8), torch.zeros(4, 2))  # A (r, in), B (out, r)
    lora = LoRAWeights({"layers.0.q_proj": q, "layers.0.v_proj": v})
    lora_bytes = (16 + 16 + 16 + 8) * 4  # float32
    versions = {
        "prefix": Adaptation(kv=torch.zeros(2, 2, 2, 4, 8)),
        "lora": Adaptation(lora=lora),
        "pt-peft": Adaptation(kv=torch.zeros(2, 2, 2, 4, 8), lora=lora),
    }
    cache = PrefixCache(lambda r: versions[r.user_id], max_bytes=10 * KV_BYTES)
    assert cache.get(ref("lora")) is versions["lora"] and cache.bytes == lora_bytes
    cache.get(ref("pt-peft"))
    assert cache.bytes == 2 * lora_bytes + KV_BYTES
    cache.get(ref("prefix"))
    assert cache.bytes == 2 * lora_bytes + 2 * KV_BYTES
    cache.invalidate_user("pt-peft")
    assert cache.bytes == lora_bytes + KV_BYTES


def test_a_row_carries_the_kv_of_each_part_that_has_one_and_the_lora_of_each_that_has_one():
    user_lora, control_kv = LoRAWeights({"q": (torch.zeros(1, 2), torch.zeros(2, 1))}), torch.zeros(2, 2, 2, 3, 8)
    user = Adaptation(lora=user_lora)
    assert row_parts([]) == (None, None)
    assert row_parts([user, control_kv]) == ([control_kv], [user_lora])  # a bare KV tensor is a prefix
    both = Adaptation(kv=torch.ones(2, 2, 2, 4, 8), lora=user_lora)
    prefix, loras = row_parts([both, Adaptation(kv=control_kv)])
    assert [p is q for p, q in zip(prefix, [both.kv, control_kv])] == [True, True] and loras == [user_lora]


def test_prefetch_reads_cold_versions_side_by_side_and_leaves_errors_to_the_request():
    """A batch of cold users waits for its slowest read, not for the sum: the loads overlap."""
    in_flight, most = 0, 0
    lock = threading.Lock()
    both_started = threading.Barrier(2, timeout=10)

    def loader(r: PrefixRef) -> torch.Tensor:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            if r.user_id in ("a", "b"):
                both_started.wait()  # returns only when two loads run at once
            if r.user_id == "broken":
                raise CorruptArtifact("bad bytes")
            return torch.full((2, 2, 2, 4, 8), float(r.version))
        finally:
            with lock:
                in_flight -= 1

    cache = PrefixCache(loader, max_bytes=10 * KV_BYTES)
    cache.get(ref("warm"))
    cache.prefetch([ref("a"), ref("b"), ref("a"), ref("warm"), ref("broken")])
    assert most >= 2 and ("a", 1) in cache and ("b", 1) in cache
    assert ("broken", 1) not in cache
    with pytest.raises(CorruptArtifact):  # the request that needs it meets the error itself
        cache.get(ref("broken"))
    misses = cache.misses
    cache.get(ref("a"))
    assert cache.misses == misses  # read ahead: the request's get is a hit
