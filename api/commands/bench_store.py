"""User prefixes resident at scale (issue 15): `steer bench cache` (api/commands/bench.py) prints it.

N users, each with one published prefix version: a registry row (SQLite, as in embedded mode,
written by `registry.publish_prefix`) and a blob of the real artifact size (fp16 safetensors of a
(L, 2, H, P, D) KV) in the local store, copied to S3 when asked. Then, in this order:

1. the registry's index lookup of each user's active version (what every request pays);
2. every prefix made resident in one `PrefixCache` through the production loader (`store_loader`:
   store read, sha256 check, artifact checks, onto the model's device as stored), each miss timed
   (cold attach from the first store); memory per resident prefix as the cache counts it and as the
   process's RSS (and the GPU's allocated bytes) grow; then every resident prefix read again (hits);
3. a cold attach of every prefix from each other store (S3), into a fresh cache;
4. a batch of `requests` users through the inference engine, every one cold (a fresh, empty cache)
   vs the same batch warm, arms in rotating order in each of `repeats` repeats, ratios within each.

Where resident prefixes live: `store_loader` puts each on the base model's device in its stored
precision (fp16), cast to the model's dtype only as a row joins a batch, so the cache holds them in
host RAM on a CPU and in device memory on a GPU at the stored size. There is no host-RAM tier behind
a GPU's cache: a miss reads the blob store (a local one is read through the OS page cache, warm here
since the blobs were just written; S3 servers keep their own caches).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import func, select

from api.commands.bench_engine import TOPICS, _prompts, _Run, _spread
from core.db import PrefixVersion, User, make_engine, make_session_factory
from core.db.migrate import upgrade_to_head
from core.engine.model import BaseModel
from core.engine.prefix import kv_from_text
from core.engine.prompts import text_ids
from core.engine.sampling import SamplingParams
from core.inference.engine import InferenceEngine
from core.inference.jobs import InferenceJob, JobFailed, RowFinished
from core.inference.prefix_cache import PrefixCache, PrefixRef, store_loader
from core.service.registry import PrefixArtifacts, active_prefix, publish_prefix
from core.storage import BlobStore, BlobStoreError, LocalBlobStore
from core.tuners.artifacts import Prefix, save_prefix

log = logging.getLogger(__name__)
GiB = 1 << 30
SCALE = 10_000
"""Prefixes the goal asks one server to hold resident ..."""
GOAL_BYTES = 8 * GiB
"""... in this much memory (fp16)."""
GOAL_ATTACH_P99_MS = 50.0
GOAL_COLD_BATCH_RATIO = 0.8
STORES = ("local", "s3")
_TEMPLATES = 8
"""Distinct texts whose KV the users' prefixes are perturbations of."""
_BATCH_TIMEOUT_S = 3600.0


def _percentiles(values: list[float], digits: int) -> dict:
    """Nearest-rank p50 / p99 (p99 of fewer than 100 samples is their maximum)."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], digits)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": round(ordered[-1], digits), "samples": len(ordered)}


def _prefix_maker(base: BaseModel, prefix_len: int) -> Callable[[int], torch.Tensor]:
    """User i's prefix KV (L, 2, H, P, D), fp32 on CPU: the model's own KV of one of a few texts, exactly
    `prefix_len` tokens, scaled by 1 + 1% noise seeded by i. Every blob differs and has the real size
    and value range, while only a few forward passes run (N of them would dominate the setup)."""
    templates = []
    for topic in TOPICS[:_TEMPLATES]:
        ids = text_ids(base.tokenizer, f"Writing about {topic}, I always say what I think plainly and at length. ")
        templates.append(kv_from_text(base, (ids * (prefix_len // len(ids) + 1))[:prefix_len]))

    def make(i: int) -> torch.Tensor:
        template = templates[i % len(templates)]
        noise = torch.randn(template.shape, generator=torch.Generator().manual_seed(i))
        return template * (1 + 0.01 * noise)

    return make


@dataclass
class _Population:
    refs: list[PrefixRef]
    stored_bytes: list[int]
    seconds: dict[str, float]
    """Time spent writing the blobs, by store (the first's includes the registry's publish)."""


def _populate(
    base: BaseModel, n: int, prefix_len: int, factory, stores: dict[str, BlobStore], written: list[tuple[str, str]]
) -> _Population:
    """n users, each with one active version published into the first store through the registry,
    the same bytes copied under the same key to the other stores. (store, key) pairs land in `written`
    as they are stored, so a failure midway still lets the caller remove them."""
    with factory() as session:
        users = [User(external_id=f"bench-cache-{i}") for i in range(n)]
        session.add_all(users)
        session.commit()
        user_ids = [user.id for user in users]
    (first, publish_store), *copies = stores.items()
    make = _prefix_maker(base, prefix_len)
    refs, sizes, seconds = [], [], dict.fromkeys(stores, 0.0)
    for i, user_id in enumerate(user_ids):
        data = save_prefix(Prefix(kv=make(i), base_model_id=base.model_id, base_fingerprint=base.fingerprint))
        artifacts = PrefixArtifacts(data, None, base.model_id, base.fingerprint, prefix_len, {})
        started = time.perf_counter()
        row = publish_prefix(factory, publish_store, user_id, artifacts, job_id=None)
        seconds[first] += time.perf_counter() - started
        written.append((first, row.blob_key))
        for name, store in copies:
            started = time.perf_counter()
            store.put(row.blob_key, data)
            seconds[name] += time.perf_counter() - started
            written.append((name, row.blob_key))
        refs.append(PrefixRef(user_id, row.version, row.blob_key, row.sha256))
        sizes.append(len(data))
    return _Population(refs, sizes, seconds)


def _index_lookups(factory, refs: list[PrefixRef]) -> list[float]:
    """Seconds of each user's active-version lookup, one session each (as a request resolves `user:<id>`)."""
    times = []
    for ref in refs:
        started = time.perf_counter()
        with factory() as session:
            row = active_prefix(session, ref.user_id)
        times.append(time.perf_counter() - started)
        if row is None or row.version != ref.version:
            raise RuntimeError(f"the registry lost user {ref.user_id}'s active version")
    return times


def _attach_all(cache: PrefixCache, refs: list[PrefixRef]) -> list[float]:
    """Seconds of each `cache.get` (misses: none of `refs` is in the cache yet)."""
    times = []
    for ref in refs:
        started = time.perf_counter()
        cache.get(ref)
        times.append(time.perf_counter() - started)
    return times


def _hits(cache: PrefixCache, refs: list[PrefixRef]) -> list[float]:
    """Seconds of a `cache.get` of each resident prefix, in a shuffled order."""
    resident = [ref for ref in refs if ref.key in cache]
    random.Random(0).shuffle(resident)
    times = []
    for ref in resident:
        started = time.perf_counter_ns()
        cache.get(ref)
        times.append((time.perf_counter_ns() - started) / 1e9)
    return times


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS growth measures what is newly held,
    not what the setup's freed garbage made room for. Elsewhere a no-op."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int | None:
    try:
        import psutil  # the test extra installs it
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _device_allocated(base: BaseModel) -> int | None:
    return torch.cuda.memory_allocated(base.device) if base.device.type == "cuda" else None


def _memory(base: BaseModel, prefix_len: int, cache: PrefixCache, stored: list[int], rss: tuple, device: tuple) -> dict:
    """Memory of the resident prefixes, per prefix and extrapolated to `SCALE` of them. `rss`, `device`:
    (before, after) the cache was filled."""
    resident = len(cache)
    per_prefix = cache.bytes / resident
    fp16 = base.geometry.numel(prefix_len) * 2

    def per(before_after: tuple) -> float | None:
        before, after = before_after
        return None if before is None or after is None else round((after - before) / resident, 1)

    rss_per, device_per = per(rss), per(device)
    held = device_per if base.device.type == "cuda" else rss_per
    return {
        "resident_prefixes": resident,
        "resident_on": f"{base.device.type} ({'device memory' if base.device.type == 'cuda' else 'host RAM'})",
        "resident_dtype": "float16",  # as stored (core/inference/prefix_cache.py's store_loader)
        "stored_bytes_per_prefix": round(sum(stored) / len(stored)),
        "kv_bytes_fp16_per_prefix": fp16,
        "cache_bytes": cache.bytes,
        "cache_bytes_per_prefix": round(per_prefix, 1),
        "rss_growth_bytes_per_prefix": rss_per,
        "device_allocated_bytes_per_prefix": device_per,
        f"gib_at_{SCALE}": {
            "cache": round(per_prefix * SCALE / GiB, 3),
            "fp16": round(fp16 * SCALE / GiB, 3),
            "measured": None if held is None else round(held * SCALE / GiB, 3),
        },
        "prefixes_in_8_gib": {
            "cache": int(GOAL_BYTES // per_prefix),
            "fp16": int(GOAL_BYTES // fp16),
            "measured": None if not held or held <= 0 else int(GOAL_BYTES // held),
        },
    }


def _engine_batch(base: BaseModel, cache: PrefixCache, jobs: list[InferenceJob]) -> tuple[_Run, float]:
    """Read the jobs' prefixes ahead and submit `jobs` one after another from this thread (as a
    distributed inference worker takes a read of its stream) to an engine on `cache`, and wait for
    every row: (the run, from the read-ahead to the last row, its CPU time all threads included;
    seconds spent before the last submit returned, where misses load)."""
    left, tokens, failures = len(jobs), 0, []
    finished = threading.Event()

    def sink(event) -> None:  # the engine thread's
        nonlocal left, tokens
        if isinstance(event, RowFinished):
            tokens += event.completion_tokens
        elif isinstance(event, JobFailed):
            failures.append(event)
        else:
            return
        left -= 1
        if left == 0:
            finished.set()

    engine = InferenceEngine(base, cache, max_batch_size=len(jobs), max_queue=2 * len(jobs)).start()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        cache.prefetch(ref for job in jobs for ref in job.prefixes)
        for job in jobs:
            engine.submit(job, sink)
        submitted = time.perf_counter() - started
        if not finished.wait(_BATCH_TIMEOUT_S):
            raise RuntimeError("the batch did not finish")
        run = _Run(tokens, time.perf_counter() - started, time.process_time() - cpu_started)
    finally:
        engine.stop()
    if failures:
        raise RuntimeError(f"{len(failures)} rows failed, e.g. {failures[0].kind}: {failures[0].message}")
    return run, submitted


def _cold_batches(
    base: BaseModel,
    refs: list[PrefixRef],
    stores: dict[str, BlobStore],
    new_tokens: int,
    repeats: int,
    cache_bytes: int,
) -> dict:
    """`len(refs)` users in one batch: warm (all resident) vs cold from each store (a fresh cache)."""
    prompts = _prompts(base, len(refs))
    loaders = {name: store_loader(store, base) for name, store in stores.items()}

    def jobs(max_tokens: int = new_tokens) -> list[InferenceJob]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        deadline = time.time() + _BATCH_TIMEOUT_S
        return [InferenceJob(p, params, prefixes=(ref,), deadline=deadline) for p, ref in zip(prompts, refs)]

    warm = PrefixCache(next(iter(loaders.values())), cache_bytes)
    _engine_batch(base, warm, jobs(2))  # warm-up; leaves every user of the batch resident
    caches: dict[str, Callable[[], PrefixCache]] = {"warm": lambda: warm}
    for name, loader in loaders.items():
        caches[f"cold_{name}"] = lambda loader=loader: PrefixCache(loader, cache_bytes)
    runs: dict[str, list[_Run]] = {name: [] for name in caches}
    submit_seconds: dict[str, list[float]] = {name: [] for name in caches}
    names = list(caches)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cache = caches[name]()
            run, submitted = _engine_batch(base, cache, jobs())
            if name != "warm" and cache.misses != len(refs):
                raise RuntimeError(f"arm {name}: {cache.misses} of {len(refs)} users were cold")
            runs[name].append(run)
            submit_seconds[name].append(submitted)

    def ratios(per: Callable[[_Run], float]) -> dict:
        """cold/warm of each store's arm, within each repeat."""
        return {
            f"cold_{name}/warm (goal >= {GOAL_COLD_BATCH_RATIO})": _spread(
                [per(cold) / per(warm) for cold, warm in zip(runs[f"cold_{name}"], runs["warm"])], 3
            )
            for name in stores
        }

    return {
        "requests": len(refs),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "submit": "prefixes read ahead (8 at a time), then one after another, as a distributed inference worker",
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "generated_tokens": {name: [run.tokens for run in arm] for name, arm in runs.items()},
        "tokens_per_s": {name: _spread([run.tokens_per_s for run in arm], 1) for name, arm in runs.items()},
        "tokens_per_cpu_s": {name: _spread([run.tokens_per_cpu_s for run in arm], 1) for name, arm in runs.items()},
        "submit_ms": {name: _spread([1000 * s for s in arm], 2) for name, arm in submit_seconds.items()},
        "ratios_by_wall_time": ratios(lambda run: run.tokens_per_s),
        "ratios_by_cpu_time": ratios(lambda run: run.tokens_per_cpu_s),
    }


def _remove(blobs: list[tuple[BlobStore, str]]) -> None:
    """Delete the benchmark's blobs from stores that outlive it; stop at the first failure (a store
    that is down would fail every one, slowly), saying what is left."""
    for done, (store, key) in enumerate(blobs):
        try:
            store.delete(key)
        except BlobStoreError as exc:
            log.warning("%d benchmark blobs left in %r (%s), e.g. %s", len(blobs) - done, store, exc, key)
            return


def _resident_pass(
    base: BaseModel, loader, refs: list[PrefixRef], cache_bytes: int, prefix_len: int, stored: list[int]
) -> tuple[dict, list[float], list[float]]:
    """Every prefix made resident in one cache through `loader`: (memory, cold attach seconds, hit seconds)."""
    loader(refs[0])  # warm-up of the load path (first safetensors parse, first device copy)
    _trim_heap()
    rss_before, device_before = _rss(), _device_allocated(base)
    cache = PrefixCache(loader, cache_bytes)
    attach = _attach_all(cache, refs)
    _trim_heap()
    rss, device = (rss_before, _rss()), (device_before, _device_allocated(base))
    return _memory(base, prefix_len, cache, stored, rss, device), attach, _hits(cache, refs)


def _goals(memory: dict, attach_ms: dict, batch: dict) -> dict:
    gib = memory[f"gib_at_{SCALE}"]
    cold = {name.removeprefix("cold_"): spread for name, spread in batch["ratios_by_wall_time"].items()}
    return {
        f"{SCALE} resident in <= 8 GiB (fp16)": gib["fp16"] <= GOAL_BYTES / GiB,
        f"{SCALE} resident in <= 8 GiB (as cached here)": gib["cache"] <= GOAL_BYTES / GiB,
        f"cold attach p99 <= {GOAL_ATTACH_P99_MS:g} ms": {
            name: figures["p99"] <= GOAL_ATTACH_P99_MS for name, figures in attach_ms.items()
        },
        f"cold batch >= {GOAL_COLD_BATCH_RATIO} x warm (median)": {
            name.split("/")[0]: spread["median"] >= GOAL_COLD_BATCH_RATIO for name, spread in cold.items()
        },
    }


def bench_cache(
    base: BaseModel,
    users: int,
    prefix_len: int,
    *,
    stores: Sequence[str] = ("local",),
    s3: BlobStore | None = None,
    requests: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    cache_bytes: int | None = None,
    work_dir: str | Path | None = None,
) -> dict:
    """Resident user prefixes at scale; see the module docstring.

    `stores`: where the blobs are, "local" (a store under a temp folder of `work_dir`) and/or "s3"
    (`s3`, whose objects written here are deleted at the end); the first holds the published
    versions, and the resident pass reads it. `cache_bytes`: the cache's budget (default: all
    `users` fit). The registry is a SQLite file in the same temp folder."""
    stores = tuple(dict.fromkeys(stores))
    if not stores or set(stores) - set(STORES):
        raise ValueError(f"stores: one or more of {', '.join(STORES)}")
    if "s3" in stores and s3 is None:
        raise ValueError("the s3 store was asked for but none was given")
    if users < max(requests, 1):
        raise ValueError(f"--users ({users}) must be at least --requests ({requests})")
    resident_bytes = base.geometry.numel(prefix_len) * 2  # fp16, as stored and as the cache holds it
    cache_bytes = users * resident_bytes if cache_bytes is None else cache_bytes
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="steer-bench-cache-", dir=work_dir) as folder:
        chosen = {name: {"local": LocalBlobStore(Path(folder) / "blobs"), "s3": s3}[name] for name in stores}
        engine = make_engine(f"sqlite:///{Path(folder) / 'steer.db'}")
        written: list[tuple[str, str]] = []
        try:
            upgrade_to_head(str(engine.url))
            factory = make_session_factory(engine)
            population = _populate(base, users, prefix_len, factory, chosen, written)
            refs, setup_s = population.refs, time.perf_counter() - started
            with factory() as session:
                active = session.scalar(select(func.count()).where(PrefixVersion.status == "active"))
            lookups = _index_lookups(factory, refs)
            loaders = {name: store_loader(store, base) for name, store in chosen.items()}
            memory, first_attach, hits = _resident_pass(
                base, loaders[stores[0]], refs, cache_bytes, prefix_len, population.stored_bytes
            )
            attach = {stores[0]: first_attach}
            for name in stores[1:]:
                attach[name] = _attach_all(PrefixCache(loaders[name], cache_bytes), refs)
            _trim_heap()
            batch = _cold_batches(base, refs[:requests], chosen, new_tokens, repeats, cache_bytes)
        finally:
            engine.dispose()
            _remove([(chosen[name], key) for name, key in written if name != "local"])  # local: the folder goes
    attach_ms = {name: _percentiles([1000 * s for s in times], 3) for name, times in attach.items()}
    return {
        "base_model": base.model_id,
        "users": users,
        "prefix_len": prefix_len,
        "stores": list(stores),
        "geometry": {"layers": base.geometry.num_layers, "kv_heads": base.geometry.num_kv_heads},
        "setup_seconds": round(setup_s, 1),
        "registry": {
            "database": "sqlite (embedded mode)",
            "active_versions": active,
            "publish_ms_per_prefix": round(1000 * population.seconds[stores[0]] / users, 3),
            "active_lookup_ms": _percentiles([1000 * s for s in lookups], 3),
        },
        "copy_ms_per_prefix": {name: round(1000 * population.seconds[name] / users, 3) for name in stores[1:]},
        "memory": memory,
        "cache_budget_bytes": cache_bytes,
        "cache_hit_us": _percentiles([1e6 * s for s in hits], 2),
        "cold_attach_ms": attach_ms,
        "cold_batch": batch,
        "goals": _goals(memory, attach_ms, batch),
    }
