"""Mixed-user generation with continuous batching.

One running batch lives on the model. Every `step()`:
  1. admits queued requests up to `max_batch_size`: they are prefilled together (each row its own
     prefix + prompt, left-padded), sample their first tokens, and their cache joins the batch;
  2. runs one decoding forward pass over all running rows, whatever user, prefix length or prompt
     length they have: each row carries its own prefix in the shared cache, its own attention mask
     and its own positions, so its result does not depend on its neighbours;
  3. samples each row with its own parameters and generator, applies its own stop rules, streams
     text deltas, and evicts finished rows (trimming cache columns no remaining row uses).

Padding columns (of prefixes or prompts) are masked for their row in every later step, so a row's
result does not depend on how wide its neighbours are; columns no row uses are trimmed away.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from core.errors import InvalidRequest
from core.model import BaseModel
from core.prefix import batch_prefixes, forward_with_prefixes
from core.sampling import SamplingParams, make_generator, sample_token

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass
class GenerationRequest:
    """One row of a mixed batch. `prefix` is a KV tensor (L, 2, H, P, D) or None for the base model."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix: torch.Tensor | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of text as soon as it is final (stop strings are never streamed)."""


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Row:
    request: GenerationRequest
    generator: torch.Generator
    next_position: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]


class MixedBatchGenerator:
    """Continuous-batching generation over one frozen base model and many users' prefixes."""

    def __init__(self, base: BaseModel, max_batch_size: int = 32, prefill_token_budget: int = 4096):
        self.base = base
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        """Most (rows x padded width) tokens one joint prefill may hold: bounds its latency and memory."""
        self._queue: deque[GenerationRequest] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, S): 1 where the cache column is real for that row
        self._cancelled: set[str] = set()
        self._eos = base.eos_token_ids

    # -- public API -------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next step with room."""
        self.validate(request)
        self._queue.append(request)

    def validate(self, request: GenerationRequest) -> None:
        request.params.validate()
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if _prefix_len(request) + len(request.prompt_ids) >= self.base.max_context:
            raise InvalidRequest(
                f"prompt of {len(request.prompt_ids)} tokens does not fit the context window "
                f"of {self.base.max_context} tokens"
            )

    def cancel(self, request_id: str) -> None:
        """Stop a request (queued or running); its slot frees at the next step."""
        self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._queue or self._rows)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @torch.inference_mode()
    def step(self) -> list[GenerationResult]:
        """Admit, decode one token for every running row, evict. Returns requests that finished."""
        finished: list[GenerationResult] = []
        self._drop_cancelled_from_queue(finished)
        while self._queue and len(self._rows) < self.max_batch_size:
            for row in self._prefill(self._admissions()):
                if row.finish_reason is not None:
                    finished.append(self._result(row))
        decoding = [row for row in self._rows if row.finish_reason is None]
        for row in decoding:
            if row.request.request_id in self._cancelled:
                row.finish_reason = FINISH_CANCELLED
        if any(row.finish_reason is None for row in self._rows):
            self._decode()
        for row in self._rows:
            if row.finish_reason is not None:
                self._cancelled.discard(row.request.request_id)
                finished.append(self._result(row))
        self._evict_finished()
        return finished

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` to completion together; results in the order given."""
        for request in requests:
            self.submit(request)
        done: dict[str, GenerationResult] = {}
        while self.has_work:
            for result in self.step():
                done[result.request_id] = result
        return [done[r.request_id] for r in requests]

    # -- one request joining the batch ----------------------------------------------------------

    def _admissions(self) -> list[GenerationRequest]:
        """The next queued requests that fit the batch and one prefill's token budget (FIFO)."""
        room = self.max_batch_size - len(self._rows)
        picked: list[GenerationRequest] = []
        widest = 0
        while self._queue and len(picked) < room:
            request = self._queue[0]
            width = max(widest, _prefix_len(request) + len(request.prompt_ids))
            if picked and width * (len(picked) + 1) > self.prefill_token_budget:
                break
            picked.append(self._queue.popleft())
            widest = width
        return picked

    def _prefill(self, requests: list[GenerationRequest]) -> list[_Row]:
        """Prefill requests together (left-padded), sample their first tokens, merge them in."""
        base = self.base
        device = base.device
        prefixes = batch_prefixes([r.prefix for r in requests], base.geometry, device=device, dtype=base.dtype)
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), base.tokenizer.pad_token_id, device=device)
        mask = torch.zeros((len(requests), width), dtype=torch.long, device=device)
        for i, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[i, width - n :] = torch.tensor(request.prompt_ids, device=device)
            mask[i, width - n :] = 1
        # Left padding puts every row's last prompt token in the last column: one logits row each.
        out = forward_with_prefixes(base, ids, mask, prefixes, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        rows, keep = [], []
        for i, request in enumerate(requests):
            row = _Row(
                request=request,
                generator=make_generator(request.params.seed),
                next_position=_prefix_len(request) + len(request.prompt_ids),
            )
            self._accept(row, sample_token(logits[i], request.params, row.generator))
            rows.append(row)
            if row.finish_reason is None:
                keep.append(i)
        if keep:
            index = torch.tensor(keep, device=device)
            for layer in out.cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            self._merge(out.cache, torch.cat([prefixes.mask, mask], dim=1).index_select(0, index))
            self._rows.extend(rows[i] for i in keep)
        return rows

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append newly prefilled rows to the running batch, left-padding whichever side is shorter."""
        if self._cache is None or not self._rows:
            self._cache, self._mask = cache, mask
            self._trim_unused_columns()
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        total = max(old_len, new_len)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, total - old_len), _left_pad(theirs.keys, total - new_len)])
            mine.values = torch.cat(
                [_left_pad(mine.values, total - old_len), _left_pad(theirs.values, total - new_len)]
            )
        self._mask = torch.cat([F.pad(self._mask, (total - old_len, 0)), F.pad(mask, (total - new_len, 0))])
        self._trim_unused_columns()

    # -- one decoding step over the whole batch ---------------------------------------------------

    def _decode(self) -> None:
        base = self.base
        device = base.device
        ids = torch.tensor([[row.last_token] for row in self._rows], device=device)
        positions = torch.tensor([[row.next_position] for row in self._rows], device=device)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        out = base.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()
        greedy = torch.argmax(logits, dim=-1).tolist()
        for i, row in enumerate(self._rows):
            row.next_position += 1
            if row.finish_reason is not None:  # cancelled this step: its column is fed but ignored
                continue
            params = row.request.params
            token = greedy[i] if params.greedy else sample_token(logits[i], params, row.generator)
            self._accept(row, token)

    def _evict_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask.index_select(0, index)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self._trim_unused_columns()

    def _trim_unused_columns(self) -> None:
        """Drop leading cache columns no row uses (departed requests, shared padding)."""
        first = int((self._mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    # -- text, stop rules and streaming -------------------------------------------------------------

    def _accept(self, row: _Row, token: int) -> None:
        params = row.request.params
        if token in self._eos and not params.ignore_eos:
            row.finish_reason = FINISH_STOP
        else:
            row.token_ids.append(token)
            row.text = self.base.tokenizer.decode(row.token_ids, skip_special_tokens=True)
            cut = min((i for i in (row.text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                row.finish_reason = FINISH_STOP
            elif len(row.token_ids) >= params.max_tokens or row.next_position + 1 >= self.base.max_context:
                row.finish_reason = FINISH_LENGTH
        self._stream(row)

    def _stream(self, row: _Row) -> None:
        if row.request.on_text is None:
            return
        text = row.text
        if row.finish_reason is None:
            # Hold back an incomplete UTF-8 character and any tail that may still become a stop string.
            text = text.rstrip("\ufffd")
            text = text[: len(text) - _stop_overlap(text, row.request.params.stop)]
        if len(text) > row.emitted:
            row.request.on_text(text[row.emitted :])
            row.emitted = len(text)

    def _drop_cancelled_from_queue(self, finished: list[GenerationResult]) -> None:
        if not self._cancelled:
            return
        for request in [r for r in self._queue if r.request_id in self._cancelled]:
            self._queue.remove(request)
            self._cancelled.discard(request.request_id)
            finished.append(GenerationResult(request.request_id, [], "", FINISH_CANCELLED, len(request.prompt_ids)))

    @staticmethod
    def _result(row: _Row) -> GenerationResult:
        return GenerationResult(
            request_id=row.request.request_id,
            token_ids=list(row.token_ids),
            text=row.text,
            finish_reason=row.finish_reason or FINISH_STOP,
            prompt_tokens=len(row.request.prompt_ids),
        )


def _prefix_len(request: GenerationRequest) -> int:
    return 0 if request.prefix is None else request.prefix.shape[3]


def _left_pad(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a (B, H, S, D) cache tensor with n zero columns on the left of S."""
    return F.pad(tensor, (0, 0, n, 0)) if n else tensor


def _stop_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
