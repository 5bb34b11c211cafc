"""The service end to end on an encoder-decoder base: STEER_BASE_MODEL = a local random BART directory.

Onboarding trains a seq2seq prefix through the job machinery, the registry stores it bound to the
BART's fingerprint and (L_enc + L_dec)-layer geometry, and completions (chat and plain) are served
with it through the mixed-batch engine: each equal to running the engine directly with that prefix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import load_base_model
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.service.registry import active_prefix
from core.tuners.artifacts import load_prefix
from tests.support.api import (
    api_client,
    bearer,
    make_settings,
    onboard,
    tiny_base_model,
    wait_for_job,
)
from tests.test_engine_seq2seq import bart_model


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory) -> Path:
    tok = tiny_base_model().tokenizer
    directory = tmp_path_factory.mktemp("bart-random")
    bart_model(len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_onboard_train_and_serve_on_a_local_bart(tmp_path: Path, bart_dir: Path):
    settings = make_settings(tmp_path, base_model=str(bart_dir))
    base = load_base_model(settings.base_model, device="cpu", dtype="float32")
    assert base.model.config.is_encoder_decoder
    with api_client(settings, base=base) as client:
        ctx = client.app.state.ctx
        body = onboard(client, "alice")
        job = wait_for_job(client, body["job"]["id"])
        assert job["status"] == "succeeded", job
        model = job["fine_tuned_model"]
        assert model.startswith(f"ft:{base.model_id}:alice:v1")
        with ctx.session_factory() as session:
            row = active_prefix(session, body["user"]["id"])
            kv = load_prefix(ctx.store.get(row.blob_key, expected_sha256=row.sha256), base).kv
        assert kv.shape == (base.geometry.num_layers, 2, base.geometry.num_kv_heads, 2, base.geometry.head_dim)

        key = bearer(body["api_key"]["key"] if isinstance(body["api_key"], dict) else body["api_key"])
        messages = [{"role": "user", "content": "Write one sentence about the sea."}]
        chat = client.post(
            "/v1/chat/completions",
            headers=key,
            json={"model": "user:alice", "messages": messages, "max_tokens": 8, "temperature": 0},
        )
        assert chat.status_code == 200, chat.text
        plain = client.post(
            "/v1/completions",
            headers=key,
            json={"model": "user:alice", "prompt": "The weather today is", "max_tokens": 6, "temperature": 0},
        )
        assert plain.status_code == 200, plain.text

    # The served text is the engine's own output with that prefix (the stored fp16 copy), greedy with
    # the loop guard the service gives a user's greedy rows.
    prompt = chat_prompt_ids(base.tokenizer, messages)
    params = SamplingParams(8, temperature=0, no_repeat_ngram=settings.greedy_no_repeat_ngram)
    direct = MixedBatchGenerator(base).generate([GenerationRequest(prompt, params, kv.to(torch.float32))])[0]
    assert chat.json()["choices"][0]["message"]["content"] == direct.text
