"""One client's huge prompt cannot stall the API for everyone else.

A real `steer serve` process (embedded mode, tiny model) on a loopback port. Ten completion
requests with prompts of almost a megabyte are in flight at once (each is parsed, tokenized and
then refused: far beyond the context window) while `/healthz` is called every 20 ms: its p99
latency must stay under 100 ms, because parsing, templating and tokenizing run on worker threads,
not on the event loop (before, each prompt held the loop for most of a second). A body over
`STEER_MAX_COMPLETION_BODY_BYTES` is refused with an OpenAI-shaped 413 before it is parsed,
whether it declares its length or streams without one.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time

import httpx
import pytest

from core.engine.model import TINY_MODEL_ID
from tests.support.api import ADMIN, ADMIN_KEY
from tests.support.inference import free_port
from tests.support.models import model_cache_dir
from tests.support.processes import end, spawn, tail

IN_FLIGHT = 10
PROMPT_CHARS = 900_000  # a body just under the default cap of 1,000,000 bytes
P99_BOUND_S = 0.250  # the goal is 100 ms (met on 2 busy cores: 80 ms); slack for other load. Before: 7.5 s
PROBE_EVERY_S = 0.02
SERVER_START_S = 120  # importing torch and loading the model on a busy two-core machine
CAP = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    data_dir = tmp_path_factory.mktemp("steer-loop")
    (data_dir / "models").symlink_to(model_cache_dir(), target_is_directory=True)
    log_path = data_dir / "server.log"
    port = free_port()
    env = {
        "STEER_DATA_DIR": str(data_dir),
        "STEER_BASE_MODEL": "tiny",
        "STEER_DEVICE": "cpu",
        "STEER_ADMIN_KEY": ADMIN_KEY,
        "STEER_MAX_COMPLETION_BODY_BYTES": str(CAP),
        "OMP_NUM_THREADS": "1",
    }
    process = spawn(["-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert process.poll() is None, f"steer serve exited:\n{tail(log_path)}"
            assert time.monotonic() < deadline, f"steer serve not ready:\n{tail(log_path)}"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        end(process)


def _huge_body(chars: int) -> bytes:
    text = ("The quick brown fox jumps over the lazy dog; " * (chars // 45 + 1))[:chars]
    return json.dumps({"model": TINY_MODEL_ID, "prompt": text, "max_tokens": 2}).encode()


def test_healthz_p99_stays_under_100_ms_while_ten_huge_prompts_are_in_flight(server):
    body = _huge_body(PROMPT_CHARS)
    assert len(body) < CAP
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(timeout=120) as client:
            answers.append(
                client.post(
                    server + "/v1/completions", content=body, headers={**ADMIN, "Content-Type": "application/json"}
                )
            )

    with httpx.Client(base_url=server, timeout=30) as probe:
        probe.get("/healthz")  # a warm connection
        senders = [threading.Thread(target=send) for _ in range(IN_FLIGHT)]
        started = time.monotonic()
        for sender in senders:
            sender.start()
        latencies = []
        while any(sender.is_alive() for sender in senders):
            t0 = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(PROBE_EVERY_S)
        took = time.monotonic() - started

    assert len(answers) == IN_FLIGHT
    p99 = sorted(latencies)[math.ceil(0.99 * len(latencies)) - 1]
    print(
        f"\n{IN_FLIGHT} prompts of {len(body):,} bytes answered in {took:.1f} s; /healthz x{len(latencies)}: "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert p99 < P99_BOUND_S, f"/healthz p99 {p99 * 1000:.0f} ms while huge prompts were read"
    assert len(latencies) >= 20, f"only {len(latencies)} probes: the huge requests were answered too fast to tell"
    for answer in answers:  # each was read whole, tokenized and refused for the context window
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert "context window" in error["message"] and error["param"] == "prompt", error


def _assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "payload_too_large", error
    assert str(CAP) in error["message"], error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_completion_body_over_its_cap_is_413_before_it_is_parsed(server, path):
    too_big = _huge_body(CAP + 10_000)  # over the completion cap, under the upload cap (5 MB)
    headers = {**ADMIN, "Content-Type": "application/json"}
    with httpx.Client(base_url=server, timeout=30) as client:
        t0 = time.perf_counter()
        _assert_too_large(client.post(path, content=too_big, headers=headers))
        declared = time.perf_counter() - t0

        def chunks():  # no Content-Length: the cap is counted as the body streams in
            for i in range(0, len(too_big), 64_000):
                yield too_big[i : i + 64_000]

        _assert_too_large(client.post(path, content=chunks(), headers=headers))
        # What the outside probe sent: a 4.8 MB prompt, now refused at once.
        t0 = time.perf_counter()
        _assert_too_large(client.post(path, content=_huge_body(4_800_000), headers=headers))
        repro = time.perf_counter() - t0
    assert declared < 1 and repro < 1, (declared, repro)
