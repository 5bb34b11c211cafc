"""`style_strength` through the API: the unchanged openai client asks for how strongly the user's
voice applies (`extra_body`), a concurrent burst of users at different strengths equals each request
run alone on the engine, 0 is the base model's answer, and the deployment's default applies when a
request names none. The strength travels inside the sampling parameters, so the Redis transport
carries it too."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from core.config import Settings
from core.db.migrate import upgrade_to_head
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import load_base_model
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.inference.catalog import prefix_ref
from core.inference.jobs import InferenceJob
from core.inference.prefix_cache import store_loader
from core.service.context import build_context
from core.service.registry import active_prefix
from tests.support.inference import ADMIN_KEY, ServerThread, build_app, create_user, publish_random_prefix
from tests.support.models import model_cache_dir

PROMPT = "Write a note about the weekend."


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny", device="cpu", dtype="float32", cache_root=model_cache_dir())


def _service(tmp_path_factory, base, **overrides):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("steer"),
        base_model="tiny",
        admin_key=ADMIN_KEY,
        max_batch_size=16,
        **overrides,
    )
    upgrade_to_head(settings.effective_database_url)
    ctx = build_context(settings, base_model=base)
    users = {name: create_user(ctx, name) for name in ("alice", "bob")}
    for seed, user in enumerate(users.values(), start=1):
        publish_random_prefix(ctx, base, user, seed=seed, prefix_len=4)
    return ctx, users


@pytest.fixture(scope="module")
def service(tmp_path_factory, base):
    ctx, users = _service(tmp_path_factory, base)
    with ServerThread(build_app(ctx)) as server:
        yield ctx, users, server
    ctx.close()


def _alone(base, ctx, user_id: str | None, strength: float, temperature: float = 0.0, seed: int | None = None) -> str:
    """The engine run directly, alone, on the user's active prefix at `strength`, decoded as the service
    decodes it: greedy on a user's prefix with the deployment's loop guard (STEER_GREEDY_NO_REPEAT_NGRAM)."""
    kv, guard = None, 0
    if user_id is not None:
        with ctx.session_factory() as session:
            kv = store_loader(ctx.store, base)(prefix_ref(active_prefix(session, user_id))).kv
        guard = ctx.settings.greedy_no_repeat_ngram if temperature == 0 else 0
    prompt = chat_prompt_ids(base.tokenizer, [{"role": "user", "content": PROMPT}])
    params = SamplingParams(12, temperature=temperature, seed=seed, style_strength=strength, no_repeat_ngram=guard)
    return MixedBatchGenerator(base).generate([GenerationRequest(prompt, params, kv)])[0].text


def _ask(server, key: str, model: str, extra: dict | None, temperature: float = 0.0, seed: int | None = None) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=temperature,
        seed=seed,
        extra_body=extra,
    )
    return reply.choices[0].message.content


def test_a_burst_of_users_at_different_strengths_equals_each_request_alone(service, base):
    ctx, users, server = service
    cases = [(name, s, t) for name in ("alice", "bob") for s in (0.0, 0.5, 1.0, 1.5) for t in (0.0, 0.8)]

    def run(case):
        name, strength, temperature = case
        seed = 7 if temperature else None
        return _ask(server, users[name].key, f"user:{name}", {"style_strength": strength}, temperature, seed)

    with ThreadPoolExecutor(len(cases)) as pool:
        burst = list(pool.map(run, cases))
    alone = [_alone(base, ctx, users[n].user_id, s, t, 7 if t else None) for n, s, t in cases]
    assert burst == alone
    by_case = dict(zip(cases, burst))
    # The base model's greedy answer under the loop guard the service gives greedy personalised rows.
    base_answer = _ask(server, ADMIN_KEY, base.model_id, {"no_repeat_ngram": ctx.settings.greedy_no_repeat_ngram})
    for name in ("alice", "bob"):
        assert by_case[(name, 0.0, 0.0)] == base_answer  # strength 0: the base model's answer
        assert by_case[(name, 1.0, 0.0)] == _ask(server, users[name].key, f"user:{name}", None)  # 1: today's
        assert by_case[(name, 1.0, 0.0)] != base_answer  # the prefix matters, so the strengths have a range


@pytest.mark.parametrize("strength", [-0.5, 2.5, "strong", True])
def test_a_strength_out_of_range_or_not_a_number_is_a_400_naming_it(service, strength):
    _, users, server = service
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(server, users["alice"].key, "user:alice", {"style_strength": strength})
    assert refused.value.body["param"] == "style_strength"


def test_the_deployments_default_strength_applies_when_a_request_names_none(tmp_path_factory, base):
    ctx, users = _service(tmp_path_factory, base, style_strength_default=0.5)
    try:
        with ServerThread(build_app(ctx)) as server:
            key, user_id = users["alice"].key, users["alice"].user_id
            assert _ask(server, key, "user:alice", None) == _alone(base, ctx, user_id, 0.5)
            assert _ask(server, key, "user:alice", {"style_strength": 1.0}) == _alone(base, ctx, user_id, 1.0)
    finally:
        ctx.close()


def test_the_strength_survives_the_transport_between_api_and_workers():
    job = InferenceJob([1, 2, 3], SamplingParams(4, temperature=0.5, style_strength=0.25))
    assert InferenceJob.from_dict(job.to_dict()).params == job.params


def test_the_deployments_loop_guard_applies_to_greedy_personalised_requests_only(tmp_path_factory, base):
    """STEER_GREEDY_NO_REPEAT_NGRAM: a greedy request on a user's prefix never repeats an n-gram
    (exactly the engine's answer with that guard); the base model's greedy answer and sampled
    requests are untouched; a request may set its own (0: off)."""
    ctx, users = _service(tmp_path_factory, base, greedy_no_repeat_ngram=3)
    try:
        with ServerThread(build_app(ctx)) as server:
            key, user_id = users["alice"].key, users["alice"].user_id

            def engine(user: str | None, guard: int, temperature: float = 0.0, seed: int | None = None) -> str:
                kv = None
                if user is not None:
                    with ctx.session_factory() as session:
                        kv = store_loader(ctx.store, base)(prefix_ref(active_prefix(session, user))).kv
                prompt = chat_prompt_ids(base.tokenizer, [{"role": "user", "content": PROMPT}])
                params = SamplingParams(12, temperature=temperature, seed=seed, no_repeat_ngram=guard)
                return MixedBatchGenerator(base).generate([GenerationRequest(prompt, params, kv)])[0].text

            assert _ask(server, key, "user:alice", None) == engine(user_id, 3)
            assert engine(user_id, 3) != engine(user_id, 0)  # the tiny model loops: the guard acts
            assert _ask(server, key, "user:alice", {"no_repeat_ngram": 0}) == engine(user_id, 0)
            assert _ask(server, ADMIN_KEY, base.model_id, None) == engine(None, 0)
            assert _ask(server, key, "user:alice", None, temperature=0.8, seed=3) == engine(user_id, 0, 0.8, 3)
    finally:
        ctx.close()
