"""`steer bench load`: a bounded load test of a real `steer serve` process on loopback.

A mix of onboarding (new users, each starting a training job), job polling and streaming
completions (a user's own `user:` model once its prefix is trained, the base model before) across
100+ users, from a fixed number of asyncio clients, in two phases against one server:

* **below capacity**: fewer concurrent requests than the server's queue holds -> zero errors;
* **above capacity**: many more concurrent completions than the queue holds -> 429s with
  Retry-After, never timeouts or 5xx.

Reported per phase and request kind: throughput, p50/p99 latency (time to first token for
streams too), status counts, errors; and the server's RSS at start, middle and end, and its
median over readings every half second.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from api.commands.server_process import ADMIN_KEY, ServerProcess

MEMORY_SAMPLE_S = 0.5
TEXTS = [
    "I like to begin with the weather, then wander off to whatever is on my mind that morning.",
    "Short sentences. Plain words. That is how I write notes to the people I work with.",
    "My grandmother's recipes are written in pencil, and I keep them in a tin by the stove.",
    "On Sundays I walk to the harbour and count the boats that did not go out.",
]


@dataclass
class Phase:
    name: str
    duration_s: float
    clients: int
    # Relative weights of the request kinds each client picks from.
    onboard: float = 0.1
    poll: float = 0.4
    stream: float = 0.5


@dataclass
class LoadConfig:
    users: int = 120
    duration_s: float = 60.0
    below_clients: int = 8
    above_clients: int = 64
    max_queue: int = 16
    max_tokens: int = 8
    request_timeout_s: float = 60.0
    seed: int = 0

    def phases(self) -> list[Phase]:
        half = self.duration_s / 2
        return [
            Phase("below_capacity", half, self.below_clients),
            # Above capacity the pressure is on generation: mostly streams.
            Phase("above_capacity", half, self.above_clients, onboard=0.0, poll=0.1, stream=0.9),
        ]


@dataclass
class KindStats:
    count: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self, seconds: float) -> dict:
        return {
            "requests": self.count,
            "per_s": round(self.count / seconds, 2),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": _pct(self.latencies, 50),
            "p99_ms": _pct(self.latencies, 99),
            "ttft_p50_ms": _pct(self.first_token, 50),
            "ttft_p99_ms": _pct(self.first_token, 99),
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
        }


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 1)


# -- the clients -----------------------------------------------------------------------------------


@dataclass
class _User:
    external_id: str
    key: str
    job_id: str
    trained: bool = False


class LoadRun:
    def __init__(self, client: httpx.AsyncClient, config: LoadConfig, model_id: str) -> None:
        self.client = client
        self.config = config
        self.model_id = model_id
        self.users: list[_User] = []
        self.rng = random.Random(config.seed)
        self.serial = 0

    async def onboard(self, stats: KindStats) -> None:
        self.serial += 1
        external_id = f"load-{self.config.seed}-{self.serial}"
        samples = [f"{t} ({external_id})" for t in self.rng.sample(TEXTS, 3)]
        body = {"external_id": external_id, "samples": samples}
        response = await self._timed(stats, "POST", "/v1/onboarding", ADMIN_KEY, body, expect=(201,))
        if response is not None and response.status_code == 201:
            data = response.json()
            self.users.append(_User(external_id, data["api_key"], data["job"]["id"]))

    async def poll(self, stats: KindStats) -> None:
        user = self.rng.choice(self.users)
        response = await self._timed(stats, "GET", f"/v1/fine_tuning/jobs/{user.job_id}", user.key, None, expect=(200,))
        if response is not None and response.status_code == 200 and response.json()["status"] == "succeeded":
            user.trained = True

    async def stream(self, stats: KindStats, allow_429: bool) -> None:
        user = self.rng.choice(self.users)
        body = {
            "model": f"user:{user.external_id}" if user.trained else self.model_id,
            "messages": [{"role": "user", "content": "Write me a short note about the weekend."}],
            "max_tokens": self.config.max_tokens,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {user.key}"}
        start = time.perf_counter()
        stats.count += 1
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                stats.statuses[response.status_code] += 1
                if response.status_code != 200:
                    await response.aread()
                    if not (allow_429 and response.status_code == 429 and response.headers.get("retry-after")):
                        stats.errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
                first = None
                done = False
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and first is None:
                        first = time.perf_counter() - start
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith('data: {"error"'):
                        stats.errors.append(line[:200])
                if not done:
                    stats.errors.append("stream ended without [DONE]")
                if first is not None:
                    stats.first_token.append(first)
        except httpx.HTTPError as exc:
            stats.errors.append(f"{type(exc).__name__}: {exc}")
            return
        stats.latencies.append(time.perf_counter() - start)

    async def _timed(self, stats, method, path, key, body, expect) -> httpx.Response | None:
        start = time.perf_counter()
        stats.count += 1
        try:
            response = await self.client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError as exc:
            stats.errors.append(f"{type(exc).__name__}: {exc}")
            return None
        stats.latencies.append(time.perf_counter() - start)
        stats.statuses[response.status_code] += 1
        if response.status_code not in expect:
            stats.errors.append(f"{response.status_code}: {response.text[:200]}")
        return response

    async def phase(self, phase: Phase, memory: ServerProcess) -> dict:
        kinds = {"onboard": KindStats(), "poll": KindStats(), "stream": KindStats()}
        weights = [phase.onboard, phase.poll, phase.stream]
        deadline = time.perf_counter() + phase.duration_s
        allow_429 = phase.name == "above_capacity"
        rss = {"start": memory.rss_bytes()}

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                kind = self.rng.choices(list(kinds), weights)[0]
                if kind == "onboard":
                    await self.onboard(kinds[kind])
                elif kind == "poll":
                    await self.poll(kinds[kind])
                else:
                    await self.stream(kinds[kind], allow_429)

        samples = [rss["start"]]

        async def sample_memory() -> None:
            # Every half second: a training job in flight (the embedded executor trains the
            # onboarded users meanwhile) lifts a single reading by 100+ MiB; the median does not.
            while time.perf_counter() < deadline:
                await asyncio.sleep(MEMORY_SAMPLE_S)
                samples.append(memory.rss_bytes())
                if "middle" not in rss and time.perf_counter() >= deadline - phase.duration_s / 2:
                    rss["middle"] = samples[-1]

        started = time.perf_counter()
        await asyncio.gather(sample_memory(), *[client_loop() for _ in range(phase.clients)])
        seconds = time.perf_counter() - started
        rss["end"] = memory.rss_bytes()
        rss.setdefault("middle", samples[len(samples) // 2])  # a phase too short to reach its midpoint
        rss["median"] = statistics.median(samples + [rss["end"]])
        total = sum(k.count for k in kinds.values())
        return {
            "phase": phase.name,
            "clients": phase.clients,
            "seconds": round(seconds, 1),
            "requests_per_s": round(total / seconds, 2),
            "kinds": {name: k.summary(seconds) for name, k in kinds.items()},
            "errors": sum(len(k.errors) for k in kinds.values()),
            "status_429": sum(k.statuses.get(429, 0) for k in kinds.values()),
            "status_5xx": sum(v for k in kinds.values() for s, v in k.statuses.items() if s >= 500),
            "timeouts": sum(1 for k in kinds.values() for e in k.errors if "Timeout" in e),
            "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
        }


async def _run(config: LoadConfig, server: ServerProcess) -> dict:
    limits = httpx.Limits(
        max_connections=config.above_clients + 16, max_keepalive_connections=config.above_clients + 16
    )
    timeout = httpx.Timeout(config.request_timeout_s + 30)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        models = (await client.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()
        run = LoadRun(client, config, models["data"][0]["id"])
        rss_before = server.rss_bytes()
        setup_stats = KindStats()
        started = time.perf_counter()
        # Onboard the population first, a few at a time (each one also queues a training job).
        semaphore = asyncio.Semaphore(config.below_clients)

        async def one() -> None:
            async with semaphore:
                await run.onboard(setup_stats)

        await asyncio.gather(*[one() for _ in range(config.users)])
        setup = {"users": len(run.users), **setup_stats.summary(time.perf_counter() - started)}
        phases = [await run.phase(phase, server) for phase in config.phases()]
        return {
            "config": asdict(config),
            "rss_mib_before_setup": round(rss_before / 2**20, 1),
            "setup": setup,
            "phases": phases,
            "users_total": len(run.users),
            "users_trained_seen": sum(u.trained for u in run.users),
        }


def run_load_test(config: LoadConfig) -> dict:
    """Start a server, run both phases against it, stop it; the report as a dict."""
    with tempfile.TemporaryDirectory(prefix="steer-load-") as tmp:
        server = ServerProcess(
            Path(tmp),
            {
                "STEER_BASE_MODEL": "tiny",
                "STEER_DEVICE": "cpu",
                "STEER_MAX_QUEUE": str(config.max_queue),
                "STEER_REQUEST_TIMEOUT_S": str(config.request_timeout_s),
                "STEER_TRAIN_MAX_STEPS_DEFAULT": "2",
                "STEER_TRAIN_BATCH_SIZE_DEFAULT": "2",
                "STEER_TRAIN_PREFIX_LEN_DEFAULT": "2",
                "STEER_TRAIN_MAX_SEQ_LEN": "64",
            },
        )
        try:
            server.wait_ready()
            report = asyncio.run(_run(config, server))
        finally:
            server.stop()
        errors = [line for line in server.log.read_text(errors="replace").splitlines() if "Error" in line]
        report["server_error_lines"] = errors[-20:]
        return report


def verdict(report: dict) -> list[str]:
    """What the report breaks of the guarantees: none below capacity, only 429s above."""
    problems = []
    if report["setup"]["errors"]:
        problems.append(f"setup: {report['setup']['errors']} errors")
    below, above = report["phases"]
    if below["errors"]:
        problems.append(f"below capacity: {below['errors']} errors")
    if above["status_5xx"] or above["timeouts"] or above["errors"]:
        problems.append(
            f"above capacity: {above['status_5xx']} 5xx, {above['timeouts']} timeouts, {above['errors']} errors"
        )
    if not above["status_429"]:
        problems.append("above capacity: no 429 (the queue never filled)")
    return problems


if __name__ == "__main__":  # pragma: no cover - `steer bench load` is the entry point
    print(json.dumps(run_load_test(LoadConfig(duration_s=float(sys.argv[1]) if len(sys.argv) > 1 else 60)), indent=2))
