"""Mixed-user generation with continuous batching.

One running batch lives on the model, and every `step()` is planned, run and read out by three parts
that know nothing of each other's insides (vLLM v1's split):

    Scheduler        (scheduler.py)  which queued requests join, in which prefill groups; who is cancelled
    BatchRunner      (runner.py)     the forward passes over the batch's BatchCache (core/engine/batch_cache/)
    OutputProcessor  (output.py)     sampled tokens -> text: incremental detokenisation, stop rules, streaming

A step (1) prefills each admitted group together (each row its own composed prefix + prompt,
left-padded) and samples their first tokens, (2) runs one decoding pass over every running row,
whatever user, prefix or prompt length it has, (3) samples all rows at once, each with its own
parameters and generator (core/engine/sampling.py), and (4) evicts finished rows. Each row's columns,
positions and mask are its own, so a row's output does not depend on its neighbours.

A request with a `style_strength` s other than 1 (and a prefix or LoRA to weaken or amplify) runs as
two rows of the same batch: its own, and a *guide* row of the base model with the same prompt that
is fed the same tokens. Its tokens are sampled from base + s * (own - base), computed per step from
the two rows' logits (classifier-free guidance, DExperts' expert-minus-base). s = 0 is served as the
base model's row alone: the same answer, one row cheaper.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from core.engine.batch_cache import Prefix, prefix_length
from core.engine.generation.output import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, OutputProcessor, RowOutput
from core.engine.generation.runner import BatchRunner, RowLoRA
from core.engine.generation.scheduler import Scheduler, StepPlan
from core.engine.generation.seq2seq import Seq2SeqRunner
from core.engine.model import BaseModel
from core.engine.sampling import SamplingParams, make_generator, sample_tokens
from core.errors import InvalidRequest

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "GenerationRequest",
    "GenerationResult",
    "MixedBatchGenerator",
    "StepPlan",
]


@dataclass
class GenerationRequest:
    """One row of a mixed batch. `prefix`: None (the base model), a KV tensor (L, 2, H, P, D), or a
    sequence of them composed in order (e.g. the user's prefix, then attribute prefixes)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix: Prefix = None
    lora: RowLoRA = None
    """None, a LoRA (core/engine/lora.py), or several composed: per-row low-rank deltas beside the prefix."""
    request_id: Hashable = field(default_factory=lambda: uuid.uuid4().hex)
    """Any hashable id, unique among the generator's requests (the inference engine uses ints)."""
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of text as soon as it is final (stop strings are never streamed)."""

    @property
    def width(self) -> int:
        """Columns this request's prefill needs: its prefix plus its prompt."""
        return prefix_length(self.prefix) + len(self.prompt_ids)

    @property
    def personalised(self) -> bool:
        return prefix_length(self.prefix) > 0 or self.lora is not None

    @property
    def guided(self) -> bool:
        """Decoded against a guide row of the base model (0 < style_strength != 1)."""
        return self.personalised and self.params.style_strength not in (0.0, 1.0)

    @property
    def rows(self) -> int:
        """Rows of the running batch this request takes: its own, and its guide row if guided."""
        return 2 if self.guided else 1


@dataclass
class GenerationResult:
    request_id: Hashable
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
    output: RowOutput
    guide: _Row | None = None
    """The base model's row this one is guided against (style_strength), if any."""
    guides: _Row | None = None
    """For a guide row: the row it guides. It shares that row's output: same tokens, same end."""

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None


class MixedBatchGenerator:
    """Continuous-batching generation over one frozen base model and many users' prefixes."""

    def __init__(self, base: BaseModel, max_batch_size: int = 32, prefill_token_budget: int = 4096):
        self.base = base
        self.scheduler = Scheduler(max_batch_size, prefill_token_budget)
        encoder_decoder = getattr(base.model.config, "is_encoder_decoder", False)
        self.runner = (Seq2SeqRunner if encoder_decoder else BatchRunner)(base)
        self.outputs = OutputProcessor(base.tokenizer, base.eos_token_ids, base.max_context)
        self._rows: list[_Row] = []  # the running batch, in the runner's row order
        self.last_plan: StepPlan | None = None

    # -- public API -------------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    def submit(self, request: GenerationRequest) -> None:
        """Validate and queue a request; it joins the running batch at the next step with room."""
        self.validate(request)
        self.enqueue(request)

    def enqueue(self, request: GenerationRequest) -> None:
        """Queue a request that already passed `validate` (the inference engine validates off its
        model thread, once per job)."""
        self.scheduler.add(request)

    def validate(self, request: GenerationRequest) -> None:
        request.params.validate()
        if request.lora is not None and isinstance(self.runner, Seq2SeqRunner):
            raise InvalidRequest("LoRA rows are served on decoder-only base models only")
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if request.width >= self.base.max_context:
            raise InvalidRequest(
                f"prompt of {len(request.prompt_ids)} tokens does not fit the context window "
                f"of {self.base.max_context} tokens"
            )

    def cancel(self, request_id: Hashable) -> None:
        """Stop a request (queued or running); its slot frees at the next step."""
        self.scheduler.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.queue or self._rows)

    @property
    def running(self) -> int:
        """Requests in the running batch (a guided one takes two rows, and counts once)."""
        return sum(row.guides is None for row in self._rows)

    @property
    def queued(self) -> int:
        return len(self.scheduler.queue)

    @torch.inference_mode()
    def step(self) -> list[GenerationResult]:
        """Admit, decode one token for every running row, evict. Returns requests that finished."""
        plan = self.last_plan = self.scheduler.plan()
        finished = [_cancelled(r) for r in plan.dropped]
        for group in plan.prefill:
            self._prefill(group)
        cancelled = set(plan.cancelled)
        for row in self._rows:
            if row.request.request_id in cancelled:
                row.output.finish_reason = FINISH_CANCELLED
        finished += self._evict_finished()
        if self._rows:
            self._decode()
            finished += self._evict_finished()
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

    # -- a step's parts ---------------------------------------------------------------------------

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Prefill a group together, sample its first tokens, and add its rows to the batch."""
        rows: list[_Row] = []
        for request in requests:
            row = _Row(request, make_generator(request.params.seed), self.outputs.new_row(request.params))
            rows.append(row)
            if request.guided:
                row.guide = _Row(request, row.generator, row.output, guides=row)
                rows.append(row.guide)
        prefixes = [_served_prefix(row) for row in rows]
        loras = [None if row.guides is not None or _as_base(row.request) else row.request.lora for row in rows]
        logits, cache = self.runner.prefill([row.request.prompt_ids for row in rows], prefixes, loras)
        self._accept(rows, logits, cache.next_position.tolist())
        self.runner.join(cache, list(range(len(rows))), loras)
        self._rows.extend(rows)

    def _decode(self) -> None:
        logits = self.runner.decode([row.output.token_ids[-1] for row in self._rows])
        self._accept(self._rows, logits, self.runner.next_positions())

    def _accept(self, rows: list[_Row], logits: torch.Tensor, positions: list[int]) -> None:
        """Sample one token for each request's row of `rows` (guide rows follow theirs)."""
        index = {id(row): i for i, row in enumerate(rows)}
        own = [i for i, row in enumerate(rows) if row.guides is None]
        if len(own) < len(rows):
            logits = logits.clone()
            for i in own:
                guide = rows[i].guide
                if guide is not None:  # base + s * (own - base), in float32
                    base = logits[index[id(guide)]]
                    logits[i] = base + rows[i].request.params.style_strength * (logits[i] - base)
            logits = logits[own]
        mine = [rows[i] for i in own]
        tokens = sample_tokens(
            logits, [r.output.params for r in mine], [r.generator for r in mine], [r.output.token_ids for r in mine]
        )
        for row, token, position in zip(mine, tokens, [positions[i] for i in own]):
            piece = self.outputs.accept(row.output, token, position)
            if piece and row.request.on_text is not None:
                row.request.on_text(piece)

    def _evict_finished(self) -> list[GenerationResult]:
        done = [row for row in self._rows if row.finished]
        if not done:
            return []
        self.runner.keep([i for i, row in enumerate(self._rows) if not row.finished])
        self._rows = [row for row in self._rows if not row.finished]
        done = [row for row in done if row.guides is None]
        for row in done:
            self.scheduler.finished(row.request.request_id)
        return [_result(row) for row in done]


def _as_base(request: GenerationRequest) -> bool:
    """style_strength 0: the base model's answer, served as its row alone."""
    return request.params.style_strength == 0.0


def _served_prefix(row: _Row) -> Prefix:
    """The prefix a batch row runs under: none for a guide row or a request at strength 0."""
    return None if row.guides is not None or _as_base(row.request) else row.request.prefix


def _result(row: _Row) -> GenerationResult:
    out = row.output
    return GenerationResult(
        request_id=row.request.request_id,
        token_ids=list(out.token_ids),
        text=out.text,
        finish_reason=out.finish_reason or FINISH_STOP,
        prompt_tokens=len(row.request.prompt_ids),
    )


def _cancelled(request: GenerationRequest) -> GenerationResult:
    return GenerationResult(request.request_id, [], "", FINISH_CANCELLED, len(request.prompt_ids))
