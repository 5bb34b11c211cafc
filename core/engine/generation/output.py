"""The output processor: token ids in, text out. Incremental detokenisation, stop rules, streaming.

Each row decodes only a short window of its most recent tokens per step (never its whole text
again), and looks for stop strings only where a new match can start. Text is streamed as soon as it
is final: an incomplete UTF-8 character, and any tail that may still become a stop string, are held
back, so a stop string is never streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from core.engine.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"

_REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence decodes to


@dataclass
class IncrementalDetokenizer:
    """Text of a growing token sequence, decoding a window of recent tokens per new token.

    vLLM's scheme: `read_offset` marks tokens whose text is final; `prefix_offset` a few tokens
    before it, decoded again as context so that word-boundary spaces come out as in a full decode.
    """

    tokenizer: PreTrainedTokenizerBase
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def add(self, token: int) -> str:
        """Append a token; returns the text it completed ("" while a character is still partial)."""
        self.token_ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""
        delta = after[len(before) :]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return delta

    def pending(self) -> str:
        """Text of tokens not yet final (a partial character at the end of the sequence)."""
        before = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        return after[len(before) :]


@dataclass
class RowOutput:
    """One request's output so far."""

    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.detokenizer.token_ids


class OutputProcessor:
    """Applies a sampled token to a row: end of sequence, stop strings, max tokens, context window."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], max_context: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context

    def new_row(self, params: SamplingParams) -> RowOutput:
        return RowOutput(params, IncrementalDetokenizer(self.tokenizer))

    def accept(self, row: RowOutput, token: int, next_position: int) -> str:
        """Apply `token` (sampled for position `next_position`); returns the text now safe to stream."""
        params = row.params
        if token in self.eos_token_ids and not params.ignore_eos:
            row.finish_reason = FINISH_STOP
            return self._streamable(row)
        searched_until = max(len(row.text) - max((len(s) for s in params.stop), default=0) + 1, 0)
        row.text += row.detokenizer.add(token)
        cut = _first_stop(row.text, params.stop, searched_until)
        if cut >= 0:
            row.text = row.text[:cut]
            row.finish_reason = FINISH_STOP
        elif len(row.token_ids) >= params.max_tokens or next_position + 1 >= self.max_context:
            row.finish_reason = FINISH_LENGTH
        if row.finish_reason is not None and cut < 0:
            row.text += row.detokenizer.pending()  # whatever a cut-off character decodes to
        return self._streamable(row)

    @staticmethod
    def _streamable(row: RowOutput) -> str:
        text = row.text
        if row.finish_reason is None:
            text = text[: len(text) - _stop_overlap(text, row.params.stop)]
        if len(text) <= row.emitted:
            return ""
        piece, row.emitted = text[row.emitted :], len(text)
        return piece


def _first_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the earliest stop string in `text` that begins at or after `start`, or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found, default=-1)


def _stop_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
