"""Preference tuning (DPO, Rafailov et al. 2023) of a user's module: its data and its loss.

A preference pair is a request (chat messages) with two answers: the one the user preferred (their
own final text: an edit of a draft, or a draft they sent) and one they did not (the draft they
edited or rejected). DPO raises the policy's log-likelihood ratio to a frozen reference policy on
the preferred answer over the other one:

    loss = -log sigmoid(beta * ((log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))))

The reference is the user's active version as served (the base model for a first version), so a
DPO step moves the user's voice towards what they chose, measured from where it stands. The
training loop (core/tuners/loop.py) runs it like any other objective: rows of many users in one
forward, each user's loss their own mean over their pairs, so a user's gradient is that of their
loss alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from core.engine.data import IGNORE, Example, clean_text
from core.engine.prompts import chat_prompt_ids, text_ids
from core.errors import InvalidTrainingData

OBJECTIVE_SFT = "sft"
OBJECTIVE_DPO = "dpo"
OBJECTIVES = (OBJECTIVE_SFT, OBJECTIVE_DPO)
NO_PREFERENCE_LOSS = math.log(2.0)
"""DPO's loss where the policy equals its reference (zero margin on every pair)."""


@dataclass(frozen=True)
class PreferencePair:
    """A request and two answers to it, the first preferred by the user."""

    messages: tuple[dict[str, str], ...]  # the request: chat turns, the last one the user's
    preferred: str
    rejected: str


@dataclass
class PairRows:
    """A pair as two training rows sharing their prompt, and the reference's log-likelihood of each
    answer (set once, before the first step)."""

    preferred: Example
    rejected: Example
    reference_preferred: float | None = None
    reference_rejected: float | None = None


def pair_rows(tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, max_len: int) -> PairRows:
    """Both answers after the request's chat prompt, only the answer tokens scored; an answer longer
    than the room left is cut (the same cut for both, so their lengths do not decide the pair)."""
    prompt = chat_prompt_ids(tokenizer, [dict(m) for m in pair.messages])
    room = max_len - len(prompt)
    if room < 8:
        raise InvalidTrainingData(f"a preference pair's request takes {len(prompt)} of {max_len} tokens")
    end = [tokenizer.eos_token_id]

    def row(answer: str) -> Example:
        body = (text_ids(tokenizer, clean_text(answer)) + end)[:room]
        return Example(prompt + body, [IGNORE] * len(prompt) + body)

    return PairRows(row(pair.preferred), row(pair.rejected))


def dpo_losses(
    preferred: torch.Tensor,
    rejected: torch.Tensor,
    reference_preferred: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (DPO loss, implicit reward margin beta * (ratio+ - ratio-)) from summed
    log-likelihoods of each answer under the policy and under the reference."""
    margin = beta * ((preferred - reference_preferred) - (rejected - reference_rejected))
    return -F.logsigmoid(margin), margin


@dataclass
class PreferenceScore:
    """How a policy ranks held-out pairs against its reference."""

    loss: float  # mean DPO loss (ln 2 = no change from the reference)
    accuracy: float  # share of pairs whose implicit reward prefers the preferred answer
    margin: float  # mean implicit reward margin
    preferred_nll: float  # token-mean negative log-likelihood of the preferred answers
    reference_preferred_nll: float  # the same under the reference


def preference_score(
    pairs: list[PairRows], sums: list[tuple[float, float]], counts: list[float], beta: float
) -> PreferenceScore:
    """`sums[i]`: pair i's summed negative log-likelihood of (preferred, rejected) under the policy;
    `counts[i]`: its preferred answer's scored tokens."""
    policy_preferred = torch.tensor([-s for s, _ in sums], dtype=torch.float64)
    policy_rejected = torch.tensor([-r for _, r in sums], dtype=torch.float64)
    reference_preferred = torch.tensor([p.reference_preferred for p in pairs], dtype=torch.float64)
    reference_rejected = torch.tensor([p.reference_rejected for p in pairs], dtype=torch.float64)
    losses, margins = dpo_losses(policy_preferred, policy_rejected, reference_preferred, reference_rejected, beta)
    tokens = max(sum(counts), 1.0)
    return PreferenceScore(
        loss=float(losses.mean()),
        accuracy=float((margins > 0).double().mean()),
        margin=float(margins.mean()),
        preferred_nll=float(-policy_preferred.sum()) / tokens,
        reference_preferred_nll=float(-reference_preferred.sum()) / tokens,
    )
