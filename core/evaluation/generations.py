"""What users get to read: texts generated under each user's adaptation, attributed by an
independent stylometric judge and checked for degeneration.

Perplexity says how well an adaptation *scores* its user's text; it says nothing of what it
*writes*. Here every user's adaptation writes answers to the same neutral prompts (chat requests
and plain openings with no topic), sampled with the service's defaults in one mixed batch, and:

* a judge that never saw a model (TF-IDF over character n-grams and a logistic regression,
  scikit-learn), trained on the users' training text only, names the author of each generated
  text. Its accuracy on the users' real held-out text is its ceiling; the base model's texts,
  labelled with the user whose seeds drew them, are chance;
* degeneration: the share of repeated word 3-grams within a text, of texts that loop (half or more
  of their 4-grams repeat an earlier one) and of empty texts — the adaptation against the base.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from core.engine.adaptation import Adaptation
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import BaseModel
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams

CHAT_PROMPTS = (
    "Write a short note to someone you work with.",
    "Tell me about your week.",
    "What do you think about the news these days?",
    "Write a few sentences about a place you know well.",
)
PLAIN_OPENINGS = ("I", "The", "We", "It is")
"""Continuation starters that carry no topic, so what the text is about comes from the adaptation."""
LOOP_SHARE = 0.5
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class GenerationSettings:
    """How each user's texts are sampled: the service's defaults unless a sweep changes them."""

    per_prompt: int = 1
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(
            self.max_tokens,
            self.temperature,
            self.top_p,
            seed=seed,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
        )


def generate_texts(
    base: BaseModel,
    adaptations: Mapping[str, Adaptation | torch.Tensor | None],
    settings: GenerationSettings,
    batch_size: int = 32,
) -> dict[str, list[str]]:
    """Each user's texts for every prompt, all users in one mixed batch. A row's seed is drawn from
    (user, prompt, draw), so the base model's rows for two users differ like two users' would."""
    prompts = [chat_prompt_ids(base.tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    prompts += [text_ids(base.tokenizer, opening) for opening in PLAIN_OPENINGS]
    return generate_for_users(
        base,
        adaptations,
        prompts,
        draws=settings.per_prompt,
        params=lambda user, p, draw: settings.params(zlib.crc32(f"{settings.seed}/{user}/{p}/{draw}".encode())),
        batch_size=batch_size,
    )


def generate_for_users(
    base: BaseModel,
    adaptations: Mapping[str, Adaptation | torch.Tensor | tuple | None],
    prompts: Sequence[list[int]],
    params: Callable[[str, int, int], SamplingParams],
    draws: int = 1,
    batch_size: int = 32,
) -> dict[str, list[str]]:
    """Every user's texts for each prompt (and draw), in prompt order, all users in one mixed batch;
    `params(user, prompt index, draw)` gives each row's sampling (its seed)."""
    requests, owners = [], []
    for user, value in adaptations.items():
        kv = value.kv if isinstance(value, Adaptation) else (list(value) if isinstance(value, tuple) else value)
        lora = value.lora if isinstance(value, Adaptation) else None
        for p, ids in enumerate(prompts):
            for draw in range(draws):
                requests.append(GenerationRequest(ids, params(user, p, draw), kv, lora, request_id=len(requests)))
                owners.append(user)
    results = MixedBatchGenerator(base, max_batch_size=batch_size).generate(requests)
    texts: dict[str, list[str]] = {user: [] for user in adaptations}
    for owner, result in zip(owners, results):
        texts[owner].append(result.text)
    return texts


class StyleJudge:
    """Names the author of a text from character n-grams: trained on the users' training text."""

    def __init__(self, train: Mapping[str, Sequence[str]], seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        texts = [t for user in train for t in train[user]]
        labels = [user for user in train for _ in train[user]]
        self.pipeline = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2, max_features=100_000),
            LogisticRegression(max_iter=2000, C=10.0, random_state=seed),
        )
        self.pipeline.fit(texts, labels)

    def attribution(self, texts: Mapping[str, Sequence[str]]) -> dict:
        """Share of each user's texts the judge gives to that user, and overall."""
        per_user, right, total = {}, 0, 0
        for user, items in texts.items():
            kept = [t for t in items if t.strip()]  # an empty text has no author to name
            hits = sum(p == user for p in self.pipeline.predict(kept)) if kept else 0
            per_user[user] = hits / len(kept) if kept else None
            right, total = right + hits, total + len(kept)
        return {"overall": right / total if total else None, "per_user": per_user, "texts": total}


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the text's word n-grams that repeat one seen earlier in the same text."""
    words = _WORDS.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (1 - len(set(grams)) / len(grams)) if grams else 0.0


def degeneration(texts: Mapping[str, Sequence[str]]) -> dict:
    """Repetition, looping and empty texts over all users' texts."""
    items = [t for user_texts in texts.values() for t in user_texts]
    if not items:
        return {"repeated_3gram": None, "looping": None, "empty": None, "texts": 0}
    return {
        "repeated_3gram": sum(repeated_ngram_share(t, 3) for t in items) / len(items),
        "looping": sum(repeated_ngram_share(t, 4) >= LOOP_SHARE for t in items) / len(items),
        "empty": sum(not t.strip() for t in items) / len(items),
        "texts": len(items),
    }


def judge_generations(
    base: BaseModel,
    adaptations: Mapping[str, Adaptation | torch.Tensor | None],
    judge: StyleJudge,
    settings: GenerationSettings,
) -> dict:
    """Generation attribution and degeneration of one method's adaptations, and the texts, to read."""
    texts = generate_texts(base, adaptations, settings)
    return {
        "settings": asdict(settings),
        "attribution": judge.attribution(texts),
        "degeneration": degeneration(texts),
        "texts": texts,
    }
