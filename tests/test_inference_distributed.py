"""Distributed mode: API (create_app with STEER_REDIS_URL) → Redis Streams → a separate
`python -m workers.infer` process, with real Postgres, Redis and SeaweedFS S3.

Same guarantees as embedded mode in small form (chat, streaming, two users, base model), plus:
killing the worker mid-stream gives the client a clean error within its deadline.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from core.config import Settings
from core.db.migrate import upgrade_to_head
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import load_base_model
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.inference.catalog import prefix_ref
from core.inference.prefix_cache import store_loader
from core.inference.redis_transport import REQUESTS_STREAM, RedisCompleter
from core.service.context import build_context
from core.service.registry import active_prefix
from tests.support.inference import ADMIN_KEY, ServerThread, build_app, create_user, publish_random_prefix
from tests.support.models import model_cache_dir
from tests.support.processes import spawn, wait_for_log

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say something about mountains."}]
REQUEST_TIMEOUT_S = 10
WORKER_START_S = 120  # importing torch and loading the model on a busy two-core machine
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, postgres_url, redis_url, s3_server):
    data_dir = tmp_path_factory.mktemp("steer-dist")
    # Share the already converted base model files instead of converting them again.
    (data_dir / "models").symlink_to(model_cache_dir(), target_is_directory=True)
    values = {
        "STEER_DATA_DIR": str(data_dir),
        "STEER_DATABASE_URL": postgres_url,
        "STEER_REDIS_URL": redis_url,
        "STEER_BASE_MODEL": "tiny",
        "STEER_DEVICE": "cpu",
        "STEER_ADMIN_KEY": ADMIN_KEY,
        "STEER_MAX_BATCH_SIZE": "8",
        "STEER_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "STEER_INFER_CLAIM_IDLE_S": "2",
        **s3_server.settings_env(bucket="steer-infer"),
    }
    upgrade_to_head(postgres_url)
    return values


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """An inference worker, returned once its model is loaded and it consumes requests: the
    requests' deadlines (REQUEST_TIMEOUT_S) must not also cover the worker's start."""
    worker = spawn(["-m", "workers.infer"], env, log_path)
    wait_for_log(worker, log_path, "consuming " + REQUESTS_STREAM, WORKER_START_S)
    return worker


@pytest.fixture(scope="module")
def service(env, tmp_path_factory):
    settings = Settings(**{k.removeprefix("STEER_").lower(): v for k, v in env.items()})
    # The test's own copy of the model, to compare with.
    base = load_base_model("tiny", device="cpu", dtype="float32", cache_root=settings.model_cache_dir)
    ctx = build_context(settings)  # as `steer serve` builds it: the API loads what it needs itself
    users = {name: create_user(ctx, name) for name in ("dist-alice", "dist-bob")}
    for seed, user in enumerate(users.values(), start=1):
        publish_random_prefix(ctx, base, user, seed=seed)
    worker = start_worker(env, tmp_path_factory.mktemp("infer-worker") / "infer.log")
    app = build_app(ctx)
    try:
        with ServerThread(app) as server:
            assert isinstance(app.state.completer, RedisCompleter)
            yield ctx, base, users, server, worker
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(10)
        ctx.close()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def direct(base, ctx, user_id: str | None, max_tokens: int = 10) -> str:
    """The engine alone, greedy as the service decodes it: on a user's prefix with the deployment's
    loop guard (STEER_GREEDY_NO_REPEAT_NGRAM), the base model without."""
    kv, guard = None, 0
    if user_id is not None:
        with ctx.session_factory() as session:
            kv = store_loader(ctx.store, base)(prefix_ref(active_prefix(session, user_id))).kv
        guard = ctx.settings.greedy_no_repeat_ngram
    ids = chat_prompt_ids(base.tokenizer, MESSAGES)
    request = GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, temperature=0, no_repeat_ngram=guard), kv)
    return MixedBatchGenerator(base).generate([request])[0].text


def test_users_and_base_model_through_redis_and_a_worker_process(service):
    ctx, base, users, server, _ = service
    texts = {}
    for name, user in users.items():
        c = client(server, user.key)
        # The first call also waits for the worker process to load its model.
        reply = c.chat.completions.create(model=f"user:{name}", messages=MESSAGES, max_tokens=10, temperature=0)
        text = reply.choices[0].message.content
        assert text == direct(base, ctx, user.user_id)
        assert reply.usage.completion_tokens > 0
        stream = c.chat.completions.create(
            model=f"user:{name}", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
        texts[name] = text
    base_reply = client(server, ADMIN_KEY).chat.completions.create(
        model=base.model_id, messages=MESSAGES, max_tokens=10, temperature=0
    )
    assert base_reply.choices[0].message.content == direct(base, ctx, None)
    assert len({*texts.values(), base_reply.choices[0].message.content}) == 3
    # Tokenizing, context checks and model ids came from the model card: the API process of the
    # distributed mode never loaded the weights.
    assert not ctx.base_model_loaded
    assert ctx.model_card().fingerprint == base.fingerprint


def test_another_users_model_is_404_before_reaching_the_workers(service):
    _, _, users, server, _ = service
    with pytest.raises(openai.NotFoundError):
        client(server, users["dist-alice"].key).chat.completions.create(
            model="user:dist-bob", messages=MESSAGES, max_tokens=4
        )


def test_killing_the_worker_mid_stream_gives_a_clean_error_within_the_deadline(service):
    _, base, users, server, worker = service
    stream = client(server, users["dist-alice"].key).completions.create(
        model="user:dist-alice", prompt="Tell me", max_tokens=1500, temperature=0, stream=True
    )
    started = time.time()
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    with pytest.raises(openai.APIError) as info:
        for _ in chunks:
            pass
    assert time.time() - started < REQUEST_TIMEOUT_S + 5
    assert "deadline" in info.value.message or "stopped" in info.value.message
