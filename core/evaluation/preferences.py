"""Preference data for the DPO evaluation — simulated feedback, said plainly.

No installable corpus records what real users did with drafts, so the evaluation simulates the
one act a writing assistant sees most: the user rewrites the model's draft as their own text. For
each of a user's samples, the request is the one derived from the sample itself (core/engine/data.py's
`derive_request`, the request the service's chat rows train on), the draft (non-preferred) is the
frozen base model's greedy answer to that request, and the user's own sample is the final text
(preferred). Pairs from the users' training samples train; pairs from their held-out test samples,
which no method ever trained on, measure.

Preference accuracy is read against the base model, for every method alike: a pair counts when the
adaptation's implicit reward log pi(y) - log base(y) is higher for the user's text than for the
draft (so SFT alone and DPO after SFT are scored by one rule; the base model itself scores 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from core.engine.adaptation import Adaptation
from core.engine.data import derive_request
from core.engine.model import BaseModel
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.evaluation.generations import generate_for_users
from core.evaluation.metrics import PrefixScorer, score_rows
from core.tuners.preference import PreferencePair, pair_rows

DRAFT_TOKENS = 64


def simulated_pairs(
    base: BaseModel, texts: Mapping[str, Sequence[str]], draft_tokens: int = DRAFT_TOKENS
) -> dict[str, list[PreferencePair]]:
    """Per user, one pair per text: (derived request, the user's text over the base model's greedy draft)."""
    requests = {user: [derive_request(text) for text in user_texts] for user, user_texts in texts.items()}
    flat = [(user, i) for user, asked in requests.items() for i in range(len(asked))]
    prompts = [chat_prompt_ids(base.tokenizer, [{"role": "user", "content": requests[user][i]}]) for user, i in flat]
    drafts = generate_for_users(
        base, {"base": None}, prompts, params=lambda *_: SamplingParams(draft_tokens, temperature=0.0)
    )["base"]
    pairs: dict[str, list[PreferencePair]] = {user: [] for user in texts}
    for (user, i), draft in zip(flat, drafts):
        text = texts[user][i]
        if draft.strip() != text.strip():  # an empty draft is a draft too (the user wrote it all)
            messages = ({"role": "user", "content": requests[user][i]},)
            pairs[user].append(PreferencePair(messages, text, draft))
    return pairs


@torch.no_grad()
def preference_accuracy(
    base: BaseModel,
    adaptations: Mapping[str, torch.Tensor | Adaptation | None],
    pairs: Mapping[str, Sequence[PreferencePair]],
    max_len: int,
    chunk: int = 16,
) -> dict:
    """Per user and overall: the share of held-out pairs whose implicit reward against the base
    model prefers the user's text, and the mean reward margin (nats)."""
    scorer = PrefixScorer(base, dict(adaptations))  # the metrics' scorer: a LoRA row sees its LoRA too
    per_user = {}
    for user, user_pairs in pairs.items():
        if not user_pairs:
            continue
        rows = [row for p in user_pairs for row in _rows(base, p, max_len)]
        own, _ = score_rows(scorer, rows, [user] * len(rows), chunk)  # summed NLL per row
        reference, _ = score_rows(scorer, rows, [None] * len(rows), chunk)
        rewards = reference - own  # log pi(y) - log base(y), (2 * pairs,)
        margins = rewards[0::2] - rewards[1::2]
        per_user[user] = {"accuracy": float((margins > 0).double().mean()), "margin": float(margins.mean())}
    overall = {key: sum(u[key] for u in per_user.values()) / len(per_user) for key in ("accuracy", "margin")}
    return {"overall": {**overall, "pairs": sum(len(p) for p in pairs.values())}, "per_user": per_user}


def _rows(base: BaseModel, pair: PreferencePair, max_len: int):
    rows = pair_rows(base.tokenizer, pair, max_len)
    return rows.preferred, rows.rejected
