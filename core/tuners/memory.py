"""A memory prefix: the frozen model's own key/values of a few of the user's real texts.

Retrieval of a user's own history helps per-user models far more than tuning alone (Salemi & Zamani
2024 on LaMP). Re-reading those texts in every prompt costs their tokens on every request; a memory
prefix costs them once: the KV the model builds for the user's most typical texts is computed at
training time and served like any prefix, composed before the user's trained prefix (which then
trains beside it, frozen, as a control trains beside its companions). Being real activations, it is
exactly the cache the model would hold after reading those texts.

"Typical" is plain and cheap: the samples whose token counts are closest (cosine) to the user's
whole training text, taken in that order until the token budget is filled.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from core.engine.data import prepare_samples
from core.engine.model import BaseModel
from core.engine.prefix import kv_from_text
from core.engine.prompts import text_ids

MEMORY_TOKENS = 64
"""Tokens of the user's own text a memory prefix holds: four times a 16-token trained prefix."""


def typical_samples(token_ids: list[list[int]]) -> list[int]:
    """Indices of the samples, most typical of the whole first: cosine of each sample's token counts
    with the counts of all samples together. Ties keep the samples' order."""
    whole = Counter(t for ids in token_ids for t in ids)
    whole_norm = math.sqrt(sum(c * c for c in whole.values()))

    def similarity(ids: list[int]) -> float:
        counts = Counter(ids)
        norm = math.sqrt(sum(c * c for c in counts.values()))
        if not norm or not whole_norm:
            return 0.0
        return sum(c * whole[t] for t, c in counts.items()) / (norm * whole_norm)

    return sorted(range(len(token_ids)), key=lambda i: -similarity(token_ids[i]))


@torch.no_grad()
def memory_prefix(base: BaseModel, samples: list[str], tokens: int = MEMORY_TOKENS) -> torch.Tensor:
    """The KV (L, 2, H, M, D) the frozen model builds reading the user's most typical samples, one
    after another, cut at `tokens` (M <= tokens; fp32 on CPU). Raises ValueError without usable text."""
    if tokens < 1:
        raise ValueError("a memory prefix needs at least one token")
    texts = prepare_samples(samples)
    ids = [text_ids(base.tokenizer, text + "\n") for text in texts]
    chosen: list[int] = []
    for i in typical_samples(ids):
        chosen.extend(ids[i])
        if len(chosen) >= tokens:
            break
    if not chosen:
        raise ValueError("no usable writing samples for a memory prefix")
    return kv_from_text(base, chosen[:tokens])
