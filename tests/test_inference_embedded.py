"""The personalised completion API in embedded mode, driven by the official `openai` client.

One uvicorn server per module on a loopback port, the tiny base model, and random prefixes
published through the registry: each user's output must be their own, identical to running the
engine directly with their prefix, and independent of who shares the batch.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from core.config import Settings
from core.db.migrate import upgrade_to_head
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import load_base_model
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.inference.catalog import prefix_ref
from core.inference.completer import InProcessCompleter
from core.inference.prefix_cache import store_loader
from core.service.context import build_context
from core.service.registry import active_prefix
from tests.support.inference import ADMIN_KEY, ServerThread, build_app, create_user, publish_random_prefix
from tests.support.models import model_cache_dir

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny", device="cpu", dtype="float32", cache_root=model_cache_dir())


def _service(tmp_path_factory, base, **limits):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("steer"),
        base_model="tiny",
        admin_key=ADMIN_KEY,
        request_timeout_s=30,
        **limits,
    )
    upgrade_to_head(settings.effective_database_url)
    return build_context(settings, base_model=base)


@pytest.fixture(scope="module")
def service(tmp_path_factory, base):
    ctx = _service(tmp_path_factory, base, max_batch_size=8, max_queue=64)
    users = {name: create_user(ctx, name) for name in ("alice", "bob", "carol", "dave")}
    for seed, name in enumerate(("alice", "bob", "carol"), start=1):
        publish_random_prefix(ctx, base, users[name], seed=seed)
    app = build_app(ctx)
    with ServerThread(app) as server:
        assert isinstance(app.state.completer, InProcessCompleter)  # embedded mode: no Redis
        yield ctx, app.state.completer, users, server
    ctx.close()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def direct(base, ctx, user_id: str | None, prompt_ids: list[int], max_tokens: int = 12, **sampling) -> str:
    """The engine run directly, alone, with the user's active prefix (None: base model), greedy as the
    service decodes it: on a user's prefix with the deployment's loop guard (STEER_GREEDY_NO_REPEAT_NGRAM)."""
    kv = None
    if user_id is not None:
        with ctx.session_factory() as session:
            row = active_prefix(session, user_id)
        kv = store_loader(ctx.store, base)(prefix_ref(row)).kv
        sampling.setdefault("no_repeat_ngram", ctx.settings.greedy_no_repeat_ngram)
    request = GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0, **sampling), kv)
    return MixedBatchGenerator(base).generate([request])[0].text


def chat(c: openai.OpenAI, model: str, max_tokens: int = 12, **kw) -> str:
    reply = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **kw)
    return reply.choices[0].message.content


def test_chat_completion_and_stream_give_each_user_their_own_output(service, base):
    ctx, _, users, server = service
    chat_ids = chat_prompt_ids(base.tokenizer, MESSAGES)
    outputs = {}
    for name in ("alice", "bob"):
        c = client(server, users[name].key)
        reply = c.chat.completions.create(model=f"user:{name}", messages=MESSAGES, max_tokens=12, temperature=0)
        text = reply.choices[0].message.content
        assert text == direct(base, ctx, users[name].user_id, chat_ids)
        assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens == len(chat_ids)
        assert reply.usage.completion_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        stream = c.chat.completions.create(
            model=f"user:{name}",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        outputs[name] = text
    base_text = chat(client(server, users["alice"].key), base.model_id)
    assert base_text == direct(base, ctx, None, chat_ids)
    assert len({outputs["alice"], outputs["bob"], base_text}) == 3


def test_completions_endpoint_and_its_stream_use_the_users_prefix(service, base):
    ctx, _, users, server = service
    ids = text_ids(base.tokenizer, PROMPT)
    c = client(server, users["bob"].key)
    reply = c.completions.create(model="user:bob", prompt=PROMPT, max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == direct(base, ctx, users["bob"].user_id, ids, max_tokens=10)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="user:bob", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    )
    assert streamed == reply.choices[0].text
    base_reply = c.completions.create(model=base.model_id, prompt=PROMPT, max_tokens=10, temperature=0)
    assert base_reply.choices[0].text == direct(base, ctx, None, ids, max_tokens=10)
    assert base_reply.choices[0].text != reply.choices[0].text


def test_concurrent_requests_of_several_users_match_each_request_alone(service, base):
    ctx, _, users, server = service
    prompts = ["The weather today is", "Once upon a time", "My favourite food"]
    cases = [(name, prompt) for name in ("alice", "bob", None) for prompt in prompts]

    def run(case):
        name, prompt = case
        key = users[name or "dave"].key
        model = f"user:{name}" if name else base.model_id
        reply = client(server, key).completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        batched = list(pool.map(run, cases))
    alone = [
        direct(base, ctx, users[name].user_id if name else None, text_ids(base.tokenizer, prompt))
        for name, prompt in cases
    ]
    assert batched == alone


def test_a_user_key_cannot_use_or_see_another_users_model(service, base):
    ctx, _, users, server = service
    alice = client(server, users["alice"].key)
    for model in ("user:bob", f"ft:{base.model_id}:bob:v1", f"ft:{base.model_id}:bob", "user:nobody", "gpt-4"):
        with pytest.raises(openai.NotFoundError) as info:
            alice.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        body = info.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
    mine = {m.id for m in alice.models.list()}
    assert mine == {base.model_id, f"ft:{base.model_id}:alice:v1", "user:alice"}
    everything = {m.id for m in client(server, ADMIN_KEY).models.list()}
    assert {"user:alice", "user:bob", f"ft:{base.model_id}:bob:v1"} <= everything
    # The admin may use anyone's model.
    assert chat(client(server, ADMIN_KEY), "user:bob") == chat(client(server, users["bob"].key), "user:bob")


def test_a_user_without_a_trained_prefix_gets_a_clear_error_but_may_use_the_base_model(service, base):
    _, _, users, server = service
    dave = client(server, users["dave"].key)
    with pytest.raises(openai.BadRequestError) as info:
        dave.chat.completions.create(model="user:dave", messages=MESSAGES, max_tokens=4)
    assert info.value.code == "model_not_ready"
    assert "no trained prefix" in info.value.message
    assert chat(dave, base.model_id, max_tokens=4)


def test_a_newly_published_version_is_used_by_the_next_request(service, base):
    ctx, _, users, server = service
    carol = client(server, users["carol"].key)
    before = chat(carol, "user:carol")
    version = publish_random_prefix(ctx, base, users["carol"], seed=99)
    after = chat(carol, "user:carol")
    assert version == 2 and after != before
    assert after == direct(base, ctx, users["carol"].user_id, chat_prompt_ids(base.tokenizer, MESSAGES))
    assert chat(carol, f"ft:{base.model_id}:carol:v1") == before  # the exact old version stays usable
    assert chat(carol, f"ft:{base.model_id}:carol:v2") == after


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"max_tokens": 0},
        {"max_tokens": 10**9},
        {"n": 0},
        {"n": 1000},
        {"stop": ["a", "b", "c", "d", "e"]},
    ],
)
def test_invalid_sampling_parameters_are_rejected_with_400(service, bad):
    _, _, users, server = service
    with pytest.raises(openai.BadRequestError) as info:
        client(server, users["alice"].key).chat.completions.create(
            model="user:alice", messages=MESSAGES, **{"max_tokens": 4, **bad}
        )
    assert info.value.response.json()["error"]["type"] == "invalid_request_error"


def test_non_finite_numbers_are_rejected_with_400(service):
    _, _, users, server = service
    # The openai client refuses to encode NaN, but a hand-written client may send it.
    for raw in ('"temperature": NaN', '"top_p": Infinity', '"temperature": -Infinity'):
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {users['alice'].key}", "Content-Type": "application/json"},
            content='{"model": "user:alice", "messages": [{"role": "user", "content": "hi"}], ' + raw + "}",
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_n_choices_are_seeded_rows(service):
    _, _, users, server = service
    c = client(server, users["alice"].key)

    def sample():
        reply = c.completions.create(model="user:alice", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7)
        return [choice.text for choice in sorted(reply.choices, key=lambda ch: ch.index)]

    first = sample()
    assert len(first) == 3 and first == sample()
    assert len(set(first)) > 1


# -- backpressure: one batch slot, one queue slot ----------------------------------------------


@pytest.fixture(scope="module")
def small_service(tmp_path_factory, base):
    ctx = _service(tmp_path_factory, base, max_batch_size=1, max_queue=1)
    user = create_user(ctx, "erin")
    app = build_app(ctx)
    with ServerThread(app) as server:
        yield app.state.completer.engine, user, server
    ctx.close()


def _wait_for(condition, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "condition not reached in time"
        time.sleep(0.02)


def _long_stream(server, key, model):
    return client(server, key).completions.create(
        model=model, prompt=PROMPT, max_tokens=400, temperature=0, stream=True
    )


def test_a_full_queue_answers_429_with_retry_after(small_service, base):
    engine, user, server = small_service
    running = _long_stream(server, user.key, base.model_id)
    next(iter(running))  # in the batch, generating
    _wait_for(lambda: engine.running == 1)
    waiting = threading.Thread(
        target=lambda: client(server, user.key).completions.create(model=base.model_id, prompt=PROMPT, max_tokens=2)
    )
    waiting.start()
    _wait_for(lambda: engine.waiting == 1)
    with pytest.raises(openai.RateLimitError) as info:
        client(server, user.key).completions.create(model=base.model_id, prompt=PROMPT, max_tokens=2)
    assert int(info.value.response.headers["Retry-After"]) >= 1
    assert info.value.code == "queue_full"
    running.close()
    waiting.join(60)


def test_a_client_that_disconnects_frees_its_batch_slot(small_service, base):
    engine, user, server = small_service
    _wait_for(lambda: engine.load == 0)
    with httpx.stream(
        "POST",
        f"{server.base_url}/completions",
        headers={"Authorization": f"Bearer {user.key}"},
        timeout=30,
        json={"model": base.model_id, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True},
    ) as response:
        lines = response.iter_lines()  # kept: an abandoned iterator would close the response early
        assert next(lines).startswith("data: ")
        _wait_for(lambda: engine.running == 1)
    # Closed after one chunk: the 1500-token job must leave the batch long before it would finish.
    _wait_for(lambda: engine.load == 0, timeout=10)
    started = time.time()
    reply = client(server, user.key).completions.create(model=base.model_id, prompt=PROMPT, max_tokens=2)
    assert reply.choices[0].text is not None and time.time() - started < 10


def test_frequency_and_presence_penalties_reach_the_users_row(service, base):
    """OpenAI's penalties through the unchanged client: the answer is the engine's with the same
    penalties, alone, and a greedy answer that repeated itself repeats less."""
    ctx, _, users, server = service
    c = client(server, users["alice"].key)
    chat_ids = chat_prompt_ids(base.tokenizer, MESSAGES)
    plain = chat(c, "user:alice", max_tokens=40)
    penalized = chat(c, "user:alice", max_tokens=40, frequency_penalty=2.0, presence_penalty=0.5)
    alone = direct(base, ctx, users["alice"].user_id, chat_ids, 40, frequency_penalty=2.0, presence_penalty=0.5)
    assert penalized == alone
    assert plain == direct(base, ctx, users["alice"].user_id, chat_ids, 40)

    def distinct_share(text: str) -> float:
        ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(set(ids)) / max(len(ids), 1)

    assert distinct_share(penalized) > distinct_share(plain), (plain, penalized)
