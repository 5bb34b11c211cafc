"""From a user's raw writing samples to training examples: clean, dedupe, split, tokenize, chunk.

Each sample becomes examples in two formats, so a prefix personalises both ways it is served:
- plain:  the text itself (completion API);
- chat:   a ChatML conversation where the user's text is the assistant turn (chat API);
          only the assistant turn is scored.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from core.prompts import chat_prompt_ids, text_ids

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
) -> list[Example]:
    """Tokenize samples into examples of at most `max_len` tokens; long samples are chunked."""
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
            instruction = CHAT_INSTRUCTIONS[i % len(CHAT_INSTRUCTIONS)]
            prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": instruction}])
            room = max_len - len(prompt)
            if room < 8:
                raise ValueError(f"max_len {max_len} leaves no room for a chat answer")
            for start in range(0, len(body), room):
                chunk = body[start : start + room]
                examples.append(Example(prompt + chunk, [IGNORE] * len(prompt) + chunk))
    return [e for e in examples if e.scored_tokens > 0]
