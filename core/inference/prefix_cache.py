"""An LRU cache of loaded user adaptations (a prefix KV, a LoRA, or both), bounded by bytes.

Keys are (user_id, version). Which version is current is *not* decided here: every request names
the exact version it wants (the API resolves `user:<id>` to the active version per request, a cheap
index lookup), so a newly published version is used by the next request without any restart. When a
user's newer version is loaded, the older versions of that user are dropped at once instead of
waiting for LRU pressure.

Loading (object store read + sha256 check + artifact verification against the base model) happens
outside the lock and at most once per key at a time: concurrent first requests for the same prefix
wait for one load instead of reading the store N times.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from core.engine.adaptation import Adaptation
from core.engine.model import BaseModel
from core.service.registry import read_version
from core.storage.base import BlobStore

log = logging.getLogger(__name__)
PREFETCH_WORKERS = 8
"""Blob reads a prefetch keeps in flight at once (I/O-bound: the GIL is released while waiting)."""


@dataclass(frozen=True)
class PrefixRef:
    """Which stored prefix a request uses: enough to load it without a database."""

    user_id: str
    version: int
    blob_key: str
    sha256: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.user_id, self.version)

    def to_dict(self) -> dict:
        return {"user_id": self.user_id, "version": self.version, "blob_key": self.blob_key, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict) -> PrefixRef:
        return cls(str(data["user_id"]), int(data["version"]), str(data["blob_key"]), str(data["sha256"]))


Loaded = Adaptation | torch.Tensor
"""One loaded version: an Adaptation (its KV (L, 2, H, P, D) and/or LoRA), or a bare KV tensor."""
Loader = Callable[[PrefixRef], Loaded]
"""Reads and verifies one version; returns it on the model's device."""


def store_loader(store: BlobStore, base: BaseModel) -> Callable[[PrefixRef], Adaptation]:
    """The production loader (every process serves through it, the distributed inference workers
    too): blob store read with sha256 check, then artifact checks against `base`; any method."""

    def load(ref: PrefixRef) -> Adaptation:
        # Resident in the stored precision (fp16): a row is cast to the model's dtype when it joins
        # a batch (the batch cache and the LoRA batch do it), the very values a cast here would
        # give, while an fp32 model's cache holds twice as many prefixes (10,000 SmolLM2 prefixes
        # of 16 tokens: 3.4 GiB instead of 6.9).
        return read_version(store, ref, base, as_stored=True).adaptation

    return load


def _nbytes(loaded: Loaded) -> int:
    """Bytes a loaded version holds: its KV and its LoRA's matrices."""
    if isinstance(loaded, torch.Tensor):
        return loaded.numel() * loaded.element_size()
    kv_bytes = 0 if loaded.kv is None else _nbytes(loaded.kv)
    return kv_bytes + (0 if loaded.lora is None else loaded.lora.nbytes())


class PrefixCache:
    """Thread-safe LRU of loaded versions with a byte budget and hit/miss/byte counters."""

    def __init__(self, loader: Loader, max_bytes: int, on_change: Callable[[PrefixCache], None] | None = None):
        self._loader = loader
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], Loaded] = OrderedDict()  # oldest first
        self._loading: dict[tuple[str, int], Future] = {}
        self._forgotten: set[tuple[str, int]] = set()  # loads under way when their user was erased
        self._lock = threading.Lock()
        self._on_change = on_change
        self.hits = 0
        self.misses = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._entries

    def get(self, ref: PrefixRef) -> Loaded:
        """The loaded version `ref`, loading it on a miss. Loader errors propagate (and are not cached)."""
        with self._lock:
            loaded = self._entries.get(ref.key)
            if loaded is not None:
                self._entries.move_to_end(ref.key)
                self.hits += 1
                self._changed()
                return loaded
            self.misses += 1
            pending = self._loading.get(ref.key)
            owner = pending is None
            if owner:
                pending = self._loading[ref.key] = Future()
            self._changed()
        if not owner:
            return pending.result()
        try:
            loaded = self._loader(ref)
        except BaseException as exc:
            with self._lock:
                del self._loading[ref.key]
                self._forgotten.discard(ref.key)
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[ref.key]
            if ref.key in self._forgotten:
                self._forgotten.discard(ref.key)
            else:
                self._insert(ref.key, loaded)
            self._changed()
        pending.set_result(loaded)
        return loaded

    def prefetch(self, refs: Iterable[PrefixRef], workers: int = PREFETCH_WORKERS) -> None:
        """Load the versions of `refs` that are not resident, up to `workers` at a time, and return
        when all are done: a batch of cold users then waits for its slowest read, not for the sum of
        its reads (32 sequential S3 reads are ~0.3 s). Errors are left for the request to meet: its
        own `get` loads again and raises. A version read ahead counts a miss here and a hit when its
        request takes it."""
        with self._lock:
            missing = list({r.key: r for r in refs if r.key not in self._entries}.values())
        if len(missing) < 2:
            return  # nothing to overlap: the request's own get loads it
        with ThreadPoolExecutor(min(workers, len(missing)), thread_name_prefix="prefix-prefetch") as pool:
            for future in [pool.submit(self.get, ref) for ref in missing]:
                if future.exception() is not None:
                    log.debug("prefetch: %s", future.exception())

    def invalidate_user(self, user_id: str) -> int:
        """Drop every cached version of `user_id` (the user was erased); the number dropped. A load
        of theirs already under way finishes for its request but is not kept."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == user_id]
            for key in keys:
                self.bytes -= _nbytes(self._entries.pop(key))
            self._forgotten.update(k for k in self._loading if k[0] == user_id)
            if keys:
                self._changed()
        return len(keys)

    # -- internals (lock held) ---------------------------------------------------------------

    def _insert(self, key: tuple[str, int], loaded: Loaded) -> None:
        user_id, version = key
        # A newer version replaces older ones of the same user; an older one never evicts a newer.
        for old in [k for k in self._entries if k[0] == user_id and k[1] < version]:
            self.bytes -= _nbytes(self._entries.pop(old))
        size = _nbytes(loaded)
        if size > self.max_bytes:
            return  # served once, but never worth evicting the whole cache for
        while self.bytes + size > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
        self._entries[key] = loaded
        self.bytes += size

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
