"""Voice *and* task: does each user's adaptation answer concrete requests, on topic, in their voice,
greedy and sampled, without degenerating?

Every adaptation (and the base model) answers the same bank of concrete requests (`TASK_REQUESTS`:
replies, notes, explanations, announcements; topics the evaluation registers plausibly cover and
ones they do not). No training row ever sees these requests (the preservation anchors have their
own, core/tuners/preservation.py). Each answer is measured three ways:

* **degenerate** (`is_degenerate`): empty, no letters at all, looping (half or more of its word
  4-grams repeat an earlier one), or a line or sentence of three or more words written three times;
* **relevant** (`is_relevant`): it names the request's topic, i.e. contains one of the content-word
  stems that request lists (a note about the weekend says "weekend", "Saturday" or "Sunday"). Chosen
  over a model-based scorer because it is transparent, costs nothing and cannot be fooled by style:
  a fragment of the user's own writing matches a stem only if it happens to be about that topic.
  Its blind spot (a relevant answer with none of the stems) hits the base model and the adaptations
  alike, so the ratio to the base model's relevance is the figure to read;
* **voice**: the independent style judge (core/evaluation/generations.py) names each answer's
  author; its accuracy on the users' real held-out text is its ceiling.

Greedy decoding (temperature 0) and the service's sampling defaults are both measured: greedy is what
many applications send, and where looping shows first.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from core.engine.adaptation import Adaptation
from core.engine.model import BaseModel
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.evaluation.generations import LOOP_SHARE, StyleJudge, generate_for_users, repeated_ngram_share


@dataclass(frozen=True)
class TaskRequest:
    text: str
    stems: tuple[str, ...]
    """An answer that addresses the request contains a word starting with one of these."""


TASK_REQUESTS = (
    TaskRequest("Write a quick note to a friend about your weekend.", ("weekend", "saturday", "sunday")),
    TaskRequest("Write a short thank-you message to a colleague who covered your shift.", ("thank", "shift", "cover")),
    TaskRequest("Announce that the new bridge over the river opens next month.", ("bridge",)),
    TaskRequest("Explain in a few sentences why saving money matters.", ("sav", "money", "spend")),
    TaskRequest("Reply to a wedding invitation, saying that you will attend.", ("wedding", "attend", "invit")),
    TaskRequest("Describe the sea on a stormy night.", ("sea", "storm", "wave", "ocean")),
    TaskRequest("Write a letter asking the town council to repair the main road.", ("road", "repair", "council")),
    TaskRequest("Explain how a bill becomes a law.", ("bill", "law", "legislat", "vote")),
    TaskRequest("Tell a friend why you liked the book you just finished.", ("book", "novel", "read", "story")),
    TaskRequest("Write a short speech welcoming new citizens.", ("citizen", "welcom")),
    TaskRequest("Explain what causes rain.", ("rain", "cloud", "water", "vapo")),
    TaskRequest("Apologise to a customer whose order arrived late.", ("sorry", "apolog", "order", "late", "deliver")),
    TaskRequest("Write a paragraph about why schools matter.", ("school", "educat", "teach", "learn")),
    TaskRequest("Give advice to someone starting a small farm.", ("farm", "crop", "soil", "animal", "land")),
    TaskRequest("Tell your team that the deadline has moved to Friday.", ("deadline", "friday")),
    TaskRequest("Describe a busy market in the morning.", ("market", "stall", "vendor", "morning")),
)

_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"[^\W_]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class AnswerSettings:
    """How the answers are decoded: the service's defaults unless told otherwise."""

    name: str
    temperature: float
    max_tokens: int = 96
    top_p: float = 1.0
    style_strength: float = 1.0
    no_repeat_ngram: int = 0
    seed: int = 0

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(
            self.max_tokens,
            self.temperature,
            self.top_p,
            seed=seed,
            style_strength=self.style_strength,
            no_repeat_ngram=self.no_repeat_ngram,
        )


GREEDY = AnswerSettings("greedy", temperature=0.0)
SAMPLED = AnswerSettings("sampled", temperature=1.0)  # the service's defaults (OpenAI's): T = 1, top_p = 1
GREEDY_NO_REPEAT = AnswerSettings("greedy, no repeated 4-gram", temperature=0.0, no_repeat_ngram=4)
"""Greedy with a loop guard (core/engine/sampling.py: no_repeat_ngram): what the service decodes greedy
personalised rows with at its default STEER_GREEDY_NO_REPEAT_NGRAM (4)."""


def at_strength(strength: float) -> tuple[AnswerSettings, ...]:
    """Greedy and sampled decoding at one style strength (core/generation: guidance against the base)."""
    return tuple(replace(one, style_strength=strength) for one in (GREEDY, SAMPLED, GREEDY_NO_REPEAT))


def is_degenerate(text: str) -> bool:
    """Empty, symbol-only, looping, or repeating a line or sentence of 3+ words three times."""
    if not _LETTER.search(text):
        return True
    if repeated_ngram_share(text, 4) >= LOOP_SHARE:
        return True
    pieces = [" ".join(_WORD.findall(p.lower())) for p in _SENTENCE.split(text)]
    counts: dict[str, int] = {}
    for piece in pieces:
        if len(piece.split()) >= 3:
            counts[piece] = counts.get(piece, 0) + 1
    return any(n >= 3 for n in counts.values())


def is_relevant(text: str, request: TaskRequest) -> bool:
    words = _WORD.findall(text.lower())
    return any(word.startswith(stem) for word in words for stem in request.stems)


def answer_requests(
    base: BaseModel,
    adaptations: Mapping[str, Adaptation | torch.Tensor | tuple | None],
    settings: AnswerSettings,
    requests: Sequence[TaskRequest] = TASK_REQUESTS,
    batch_size: int = 32,
) -> dict[str, list[str]]:
    """Each user's answers to every request, all users in one mixed batch (seeds per user and
    request, so the base model's answers for two users differ like two users' would when sampled)."""
    prompts = [chat_prompt_ids(base.tokenizer, [{"role": "user", "content": r.text}]) for r in requests]
    return generate_for_users(
        base,
        adaptations,
        prompts,
        params=lambda user, r, _: settings.params(zlib.crc32(f"{settings.seed}/{user}/task{r}".encode())),
        batch_size=batch_size,
    )


def task_measures(
    answers: Mapping[str, Sequence[str]], judge: StyleJudge | None, requests: Sequence[TaskRequest] = TASK_REQUESTS
) -> dict:
    """Degeneration, relevance and (with a judge) voice of every user's answers, overall and per user."""
    per_user = {}
    for user, texts in answers.items():
        per_user[user] = {
            "degenerate": sum(map(is_degenerate, texts)) / len(texts),
            "relevant": sum(is_relevant(t, r) for t, r in zip(texts, requests)) / len(texts),
        }
    overall = {key: sum(p[key] for p in per_user.values()) / len(per_user) for key in ("degenerate", "relevant")}
    if judge is not None:
        attribution = judge.attribution(answers)
        overall["judge_attribution"] = attribution["overall"]
        for user, share in attribution["per_user"].items():
            per_user[user]["judge_attribution"] = share
    return {"overall": overall, "per_user": per_user}


def measure_tasks(
    base: BaseModel,
    adaptations: Mapping[str, Adaptation | torch.Tensor | tuple | None],
    judge: StyleJudge | None,
    settings: Sequence[AnswerSettings] = (GREEDY, SAMPLED, GREEDY_NO_REPEAT),
) -> dict:
    """`task_measures` of the adaptations' answers under each decoding, and the answers, to read."""
    measured = {}
    for one in settings:
        answers = answer_requests(base, adaptations, one)
        measured[one.name] = {"settings": asdict(one), **task_measures(answers, judge), "answers": answers}
    return measured
