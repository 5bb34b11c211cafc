"""Shared engine fixtures: the base models (loaded once per test session), and the requests, rows and
writing that the engine's equivalence tests share across model families."""

import pytest
import torch

from core.engine.generation import GenerationRequest
from core.engine.model import load_base_model
from core.engine.prefix import PrefixConfig, kv_from_text
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.tuners.base import TrainingConfig
from tests.support.models import model_cache_dir

ALICE = [f"Alice writes about gardens, roses number {i}, and the quiet of early mornings." for i in range(8)]
BOB = [f"Bob reports quarterly figures: revenue grew {i} percent and costs fell sharply." for i in range(10)]
CAROL = ["Carol: short note.", "Carol: another very short note, with commas, and more words here."]


@pytest.fixture(scope="session")
def tiny():
    """A ~3M-parameter random Llama with GQA and the real SmolLM2 tokenizer."""
    return load_base_model("tiny", device="cpu", dtype="float32", cache_root=model_cache_dir())


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (slow tests only)."""
    return load_base_model("smollm2", device="cpu", dtype="float32", cache_root=model_cache_dir())


def mixed_requests(base):
    """Different users (prefixes of different lengths), one base-model row, rows composing different
    sets of control prefixes with a user's (or alone), greedy and seeded sampling, with and without
    frequency/presence penalties."""
    tok = base.tokenizer
    user_a = kv_from_text(base, text_ids(tok, "My fellow citizens, the state of our union is strong. We have"))
    user_b = kv_from_text(base, text_ids(tok, "Dear team, a quick note about the quarterly numbers:"))[:, :, :, :6]
    formal, brief = control_prefixes(base)

    def chat(message):
        return chat_prompt_ids(tok, [{"role": "user", "content": message}])

    return [
        GenerationRequest(chat("Write a sentence about the economy."), SamplingParams(24, temperature=0), user_a),
        GenerationRequest(chat("Say hi."), SamplingParams(16, temperature=0), None),
        GenerationRequest(text_ids(tok, "The weather today"), SamplingParams(20, temperature=0), user_b),
        GenerationRequest(chat("List three fruits."), SamplingParams(28, temperature=0.8, top_p=0.9, seed=3), user_a),
        GenerationRequest(text_ids(tok, "Once upon a time"), SamplingParams(12, temperature=1.0, seed=11), user_b),
        GenerationRequest(
            chat("Write a sentence about the economy."), SamplingParams(20, temperature=0), [user_a, formal]
        ),
        GenerationRequest(
            text_ids(tok, "The weather today"), SamplingParams(16, temperature=0), [user_b, formal, brief]
        ),
        GenerationRequest(chat("Say hi."), SamplingParams(12, temperature=0), [brief]),
        GenerationRequest(chat("List three fruits."), SamplingParams(16, temperature=0.8, seed=5), [user_a, brief]),
        # OpenAI's penalties, from each row's own generated tokens: greedy and sampled.
        GenerationRequest(text_ids(tok, "Once upon a time"), SamplingParams(24, 0.0, frequency_penalty=1.5), user_a),
        GenerationRequest(chat("Say hi."), SamplingParams(16, 0.9, seed=2, presence_penalty=0.8), [user_b, brief]),
    ]


def control_prefixes(base):
    """Two stand-in control prefixes ("formal", "brief"): the model's own KV of a short text each."""
    tok = base.tokenizer
    formal = kv_from_text(base, text_ids(tok, "Ladies and gentlemen, it is my distinct honour"))[:, :, :, :5]
    brief = kv_from_text(base, text_ids(tok, "Short. Done."))
    return formal, brief


def padded_rows(prompts: list[list[int]], pad_token_id: int, left_pad: bool):
    """Prompts as one (B, T) batch padded on the left or the right: ids, mask, and each row's span."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_token_id)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    spans = []
    for i, p in enumerate(prompts):
        start = T - len(p) if left_pad else 0
        ids[i, start : start + len(p)] = torch.tensor(p)
        mask[i, start : start + len(p)] = 1
        spans.append(slice(start, start + len(p)))
    return ids, mask, spans


def small_training_config(**overrides) -> TrainingConfig:
    """A few quick steps on the tiny models: small prefixes, short rows, no early stop."""
    values = dict(
        prefix=PrefixConfig(prefix_len=4, embedding_dim=16, hidden_dim=32),
        learning_rate=1e-2,
        max_steps=6,
        batch_size=3,
        max_seq_len=48,
        eval_every=2,
        patience=100,
        warmup_steps=1,
        seed=7,
    )
    values.update(overrides)
    return TrainingConfig(**values)
