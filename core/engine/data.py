"""From a user's raw writing samples to training examples: clean, dedupe, split, tokenize, chunk.

Each sample becomes examples in two formats, so a prefix personalises both ways it is served:
- plain:  the text itself (completion API);
- chat:   a ChatML conversation where the user's text is the assistant turn (chat API);
          only the assistant turn is scored.

What the chat turn's request says decides what the prefix learns about requests. With one of four
generic requests ("Write a passage in my voice.", `REQUESTS_GENERIC`) it learns "whatever is asked,
write a fragment of this user"; with a request derived from the sample itself (`REQUESTS_DERIVED`:
"Write a few sentences about the tariff, the treasury and revenue." for a paragraph on those) the
answer carries the request's topic, so the prefix learns how this user answers *a* request.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from core.engine.prompts import chat_prompt_ids, text_ids

FORMAT_PLAIN = "plain"
FORMAT_CHAT = "chat"
IGNORE = -100

# Requests for "something in my voice": the chat examples pair each sample with one of these.
CHAT_INSTRUCTIONS = (
    "Write a passage in my voice.",
    "Write the next paragraph.",
    "Continue writing.",
    "Write something the way I would.",
)

REQUESTS_GENERIC = "generic"
REQUESTS_DERIVED = "derived"
CHAT_REQUESTS = (REQUESTS_GENERIC, REQUESTS_DERIVED)

# Extractive request derivation: a sample's most frequent content words name its topic. Function
# words and the vaguest verbs carry none; the list is small on purpose (English only).
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each even ever every few for from
    further get got had has have having he her here hers herself him himself his how i if in into is it
    its itself just know let like made make many may me might more most much must my myself never new no
    nor not now of off often on once one only or other our ours ourselves out over own per quite rather
    really said same say see shall she should since so some still such than that the their theirs them
    themselves then there these they thing things this those though through thus to too under until up
    upon us very was way we well were what when where whether which while who whom whose why will with
    within without would yet you your yours yourself yourselves thank thanks dear hello hi yes ok okay
    shall let's i'm it's don't can't we're i've i'll""".split()
)
_TOPIC_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
_REQUEST_TEMPLATES = (
    "Write a few sentences about {topic}.",
    "Write a short piece on {topic}.",
    "Tell me about {topic}.",
    "Write a paragraph about {topic}.",
)


def topic_words(text: str, count: int = 3) -> list[str]:
    """The `count` content words of `text` that most look like its topic, lower-cased: repeated words
    first, then long ones (a cheap stand-in for "nouns": no tagger in the serving path); adverbs in
    -ly never. Ties: the first seen."""
    seen: dict[str, int] = {}
    order: dict[str, int] = {}
    for i, word in enumerate(_TOPIC_WORD.findall(text)):
        key = word.lower().strip("'-")
        if key in _STOPWORDS or len(key) < 4 or key.endswith("ly") or "'" in key:
            continue
        seen[key] = seen.get(key, 0) + 1
        order.setdefault(key, i)
    return sorted(seen, key=lambda w: (-seen[w], -min(len(w), 9), order[w]))[:count]


def derive_request(text: str) -> str:
    """A request that `text` answers, from its own words (no model involved): its topic words in one
    of a few request forms, chosen by the text's fingerprint (the same text, the same request)."""
    words = topic_words(text)
    if not words:
        return CHAT_INSTRUCTIONS[int(sample_fingerprint(text), 16) % len(CHAT_INSTRUCTIONS)]
    topic = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    template = _REQUEST_TEMPLATES[int(sample_fingerprint(text), 16) % len(_REQUEST_TEMPLATES)]
    return template.format(topic=topic)


def chat_request(text: str, index: int, requests: str) -> str:
    """The request of a sample's chat example: generic (rotated by `index`) or derived from it."""
    if requests == REQUESTS_DERIVED:
        return derive_request(text)
    if requests != REQUESTS_GENERIC:
        raise ValueError(f"chat requests must be one of {CHAT_REQUESTS}, not {requests!r}")
    return CHAT_INSTRUCTIONS[index % len(CHAT_INSTRUCTIONS)]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def clean_text(text: str) -> str:
    """Normalise a sample: NFC, no control characters (newlines and tabs stay), tidy whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def sample_fingerprint(text: str) -> str:
    """sha256 of the cleaned text with whitespace collapsed: equal for near-identical copies."""
    return hashlib.sha256(" ".join(clean_text(text).split()).encode()).hexdigest()


def prepare_samples(texts: list[str]) -> list[str]:
    """Cleaned, non-empty, de-duplicated samples, first occurrence kept, order preserved."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        cleaned = clean_text(text)
        key = sample_fingerprint(cleaned)
        if cleaned and key not in seen:
            seen.add(key)
            kept.append(cleaned)
    return kept


def split_samples(samples: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded train/validation split. Under 4 samples there is no validation set."""
    if len(samples) < 4 or val_fraction <= 0:
        return list(samples), []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(samples) * val_fraction))
    val = {i for i in order[:n_val]}
    return [s for i, s in enumerate(samples) if i not in val], [s for i, s in enumerate(samples) if i in val]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not the user's own text

    @property
    def scored_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    samples: list[str],
    max_len: int,
    formats: tuple[str, ...] = (FORMAT_PLAIN, FORMAT_CHAT),
    chat_requests: str = REQUESTS_GENERIC,
) -> list[Example]:
    """Tokenize samples into examples of at most `max_len` tokens; long samples are chunked. A chat
    example's request is generic or derived from the sample (`chat_requests`, see the module doc)."""
    end = tokenizer.eos_token_id
    examples: list[Example] = []
    for i, text in enumerate(samples):
        body = text_ids(tokenizer, text) + [end]
        if FORMAT_PLAIN in formats:
            for start in range(0, len(body), max_len):
                chunk = body[start : start + max_len]
                if len(chunk) > 1:
                    examples.append(Example(chunk, list(chunk)))
        if FORMAT_CHAT in formats:
            instruction = chat_request(text, i, chat_requests)
            prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": instruction}])
            room = max_len - len(prompt)
            if room < 8:
                raise ValueError(f"max_len {max_len} leaves no room for a chat answer")
            for start in range(0, len(body), room):
                chunk = body[start : start + room]
                examples.append(Example(prompt + chunk, [IGNORE] * len(prompt) + chunk))
    return [e for e in examples if e.scored_tokens > 0]
