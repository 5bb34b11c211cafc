"""Prefix tuning of encoder-decoder base models (T5, BART): examples, prefixes from text, losses, training.

A seq2seq prefix is one KV tensor (L_enc + L_dec, 2, H, P, D) (core/batch_cache.py, Seq2SeqBatchCache):
the encoder part is in front of the source at every encoder layer, the decoder part in front of the
target at every decoder layer. It trains in the same reparameterized form as a decoder-only prefix
(core/prefix.py: PrefixEncoder, KV = base + MLP(E), over the combined tensor) and exports to the
same artifact.

A user's writing becomes (source, target) pairs: the target is a chunk of the user's text, the source
what it answers or continues — a writing instruction for a sample's first chunk, the previous chunk
for the others. Many users train in one forward/backward pass; the objective is the sum over users of
each user's own token-mean loss, so each user's gradient is that of training them alone.

This module keeps its own small loop (steps or epochs, time budget, cancellation, progress, AdamW,
warmup then linear decay, gradient clipping per user) instead of the shared one in core/training.py:
that loop scores next tokens of one sequence through the base model's LM head on hidden states (a
method never sees which tokens are scored), and its preservation anchors are sampled by decoder-only
generation; a seq2seq method needs (source, target) rows and the model's own logits (T5 rescales the
decoder output before its tied head, BART adds a logits bias).
`core.training.train_prefixes` hands an encoder-decoder base to `train_seq2seq_from_samples`, so the
service's jobs train it unchanged. Not here yet: validation split and early stopping, the
preservation term, prefix-length search.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from core.batch_cache import Prefix, Seq2SeqBatchCache, seq2seq_hooks
from core.data import CHAT_INSTRUCTIONS, prepare_samples
from core.errors import InvalidTrainingData, TrainingCancelled
from core.model import BaseModel
from core.prefix import INIT_ACTIVATIONS, PrefixConfig, PrefixEncoder
from core.prompts import chat_prompt_ids, text_ids
from core.training import Progress, TrainedPrefix, TrainingConfig, UserData


@dataclass
class Seq2SeqExample:
    source_ids: list[int]
    target_ids: list[int]
    """Scored tokens (ending with end-of-sequence when the text ends there)."""


@dataclass
class Seq2SeqUser:
    user_id: str
    examples: list[Seq2SeqExample]
    resume_state: dict[str, torch.Tensor] | None = None
    prefix: PrefixConfig | None = None


def is_encoder_decoder(base: BaseModel) -> bool:
    return bool(getattr(base.model.config, "is_encoder_decoder", False))


def _pad_id(base: BaseModel) -> int:
    pad = base.tokenizer.pad_token_id if base.tokenizer is not None else None
    return pad if pad is not None else (base.model.config.pad_token_id or 0)


def _eos_id(base: BaseModel) -> int | None:
    eos = base.model.config.eos_token_id
    if eos is None and base.tokenizer is not None:
        eos = base.tokenizer.eos_token_id
    return eos


def _instruction_ids(tokenizer, instruction: str) -> list[int]:
    """A writing instruction as the chat API sends it (the model's chat template), else as plain text."""
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": instruction}])
    return text_ids(tokenizer, instruction)


def build_seq2seq_examples(base: BaseModel, samples: list[str], max_len: int = 64) -> list[Seq2SeqExample]:
    """(source, target) pairs from a user's writing: targets are chunks of at most `max_len` tokens;
    a sample's first chunk answers a writing instruction (as a chat request, the way the chat API
    will prompt), every later chunk continues the previous one (as a plain completion prompt)."""
    eos = _eos_id(base)
    examples = []
    for n, text in enumerate(prepare_samples(samples)):
        ids = text_ids(base.tokenizer, text)
        chunks = [ids[i : i + max_len] for i in range(0, len(ids), max_len)]
        for k, chunk in enumerate(chunks):
            instruction = CHAT_INSTRUCTIONS[n % len(CHAT_INSTRUCTIONS)]
            source = _instruction_ids(base.tokenizer, instruction) if k == 0 else chunks[k - 1]
            last = k == len(chunks) - 1
            examples.append(Seq2SeqExample(source, chunk + ([eos] if last and eos is not None else [])))
    return examples


def seq2seq_users(base: BaseModel, users: list[UserData], config: TrainingConfig) -> list[Seq2SeqUser]:
    """Training users from writing samples (the decoder-only jobs' UserData)."""
    out = []
    for user in users:
        examples = build_seq2seq_examples(base, user.samples, max(config.max_seq_len // 2, 8))
        if not examples:
            raise InvalidTrainingData(f"user {user.user_id}: no usable writing samples")
        out.append(Seq2SeqUser(user.user_id, examples, user.resume_state, user.prefix))
    return out


@torch.no_grad()
def seq2seq_kv_from_text(base: BaseModel, token_ids: list[int]) -> torch.Tensor:
    """A prefix (L_enc + L_dec, 2, H, n, D) from text: the encoder's K/V of `token_ids` read as a
    source, and the decoder's K/V of writing them (start token + all but the last, given that source).

    The decoder part is exactly what the decoder holds after writing that text (for BART, whose
    tokens after a prefix restart at position 0, the text continues exactly only with the hooks'
    `positions_after_prefix`). The encoder part is exact at the first layer only: the encoder is
    bidirectional, so in running text "a + b" the deeper K/V of a also depend on b, which a prefix
    computed from a alone cannot know. Either way it is a starting point for training."""
    model, geometry = base.model, base.geometry
    capture: list = []
    cache = Seq2SeqBatchCache.encode(model, [token_ids], [None], geometry, pad_token_id=_pad_id(base), capture=capture)
    encoder = torch.stack([torch.stack([k[0], v[0]]) for k, v in capture])  # (L_enc, 2, H, n, D)
    cache.start()
    if len(token_ids) > 1:
        cache.decode(torch.tensor([token_ids[:-1]], device=base.device))
    decoder = cache.decoder_kv(0)  # (L_dec, 2, H, n, D)
    return torch.cat([encoder, decoder]).float().cpu()


def seq2seq_loss_sums(base: BaseModel, rows: Sequence[Seq2SeqExample], prefixes: Sequence[Prefix]):
    """Per row, summed target-token cross-entropy and the number of scored tokens ((B,), (B,)),
    row i under prefixes[i] (None = the base model). Differentiable in the prefixes."""
    model = base.model
    device = base.device
    cache = Seq2SeqBatchCache.encode(
        model, [r.source_ids for r in rows], list(prefixes), base.geometry, pad_token_id=_pad_id(base)
    )
    start = cache.hooks.decoder_start_token_id
    width = max(len(r.target_ids) for r in rows)
    ids = torch.full((len(rows), width), _pad_id(base), dtype=torch.long, device=device)
    labels = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        n = len(row.target_ids)
        ids[i, :n] = torch.tensor([start] + row.target_ids[:-1], device=device)
        labels[i, :n] = torch.tensor(row.target_ids, device=device)
        mask[i, :n] = 1
    logits = cache.decode(ids, mask).logits.float()  # (B, T, V)
    scored = labels != -100
    losses = torch.zeros(scored.shape, device=device)
    losses[scored] = F.cross_entropy(logits[scored], labels[scored], reduction="none")
    return losses.sum(dim=1), scored.sum(dim=1).float()


class _Run:
    """One user's prefix, optimizer, schedule and data order during a (shared) job."""

    def __init__(self, base: BaseModel, user: Seq2SeqUser, config: TrainingConfig):
        if not user.examples:
            raise InvalidTrainingData(f"user {user.user_id}: no training examples")
        self.user = user
        self.prefix = user.prefix or config.prefix
        init_kv = None
        if user.resume_state is None and self.prefix.init == INIT_ACTIVATIONS:
            init_kv = seq2seq_kv_from_text(base, _init_tokens(user.examples, self.prefix.prefix_len))
        generator = torch.Generator().manual_seed(config.seed)  # per user: the same alone or beside others
        self.encoder = PrefixEncoder(base.geometry, self.prefix, init_kv, generator).to(base.device)
        if user.resume_state is not None:
            self.encoder.load_state_dict(user.resume_state)
        self.params = list(self.encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup, span = config.warmup_steps, max(config.max_steps - config.warmup_steps, 1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (s + 1) / warmup if s < warmup else max(0.1, 1.0 - (s - warmup) / span),
        )
        self.order = random.Random(config.seed)
        self.stream: list[int] = []
        self.loss = float("nan")
        self.tokens = 0
        self.steps = 0
        self.max_steps = config.max_steps
        if config.epochs is not None:
            per_epoch = math.ceil(len(user.examples) / config.batch_size)
            self.max_steps = min(config.max_steps, max(1, math.ceil(config.epochs * per_epoch)))

    def next_batch(self, n: int) -> list[Seq2SeqExample]:
        while len(self.stream) < n:
            epoch = list(range(len(self.user.examples)))
            self.order.shuffle(epoch)
            self.stream.extend(epoch)
        picked, self.stream = self.stream[:n], self.stream[n:]
        return [self.user.examples[i] for i in picked]


def _init_tokens(examples: list[Seq2SeqExample], n: int) -> list[int]:
    ids = [t for e in examples for t in e.target_ids][:n]
    return (ids * (n // max(len(ids), 1) + 1))[:n] if ids else [0] * n


def train_seq2seq_prefixes(
    base: BaseModel,
    users: list[Seq2SeqUser],
    config: TrainingConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainedPrefix]:
    """Train one prefix per user; all users share each forward/backward pass over the frozen base,
    and each user's result equals training them alone (sum of per-user token means)."""
    if not users:
        raise InvalidTrainingData("no users to train")
    if len({u.user_id for u in users}) != len(users):
        raise InvalidTrainingData("a user appears twice in one training job")
    started = time.monotonic()
    base.model.requires_grad_(False)
    everyone = [_Run(base, u, config) for u in users]
    total = max(run.max_steps for run in everyone)
    for step in range(1, total + 1):
        runs = [run for run in everyone if run.steps < run.max_steps]  # each user stops at their own limit
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled("training cancelled")
        if config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s:
            break
        step_started = time.monotonic()
        rows, owners, kvs = [], [], []
        for index, run in enumerate(runs):
            run.optimizer.zero_grad(set_to_none=True)
            kv = run.encoder()  # once per user: one backward through it
            batch = run.next_batch(config.batch_size)
            rows += batch
            owners += [index] * len(batch)
            kvs += [kv] * len(batch)
        sums, counts = seq2seq_loss_sums(base, rows, kvs)
        owner = torch.tensor(owners, device=sums.device)
        per_user = torch.zeros(len(runs), device=sums.device).index_add(0, owner, sums)
        tokens = torch.zeros(len(runs), device=sums.device).index_add(0, owner, counts)
        per_user = per_user / tokens.clamp(min=1)
        per_user.sum().backward()  # each user's gradient is that of their own loss alone
        for index, run in enumerate(runs):
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
            run.optimizer.step()
            run.schedule.step()
            run.loss = float(per_user[index].detach())
            run.tokens += int(tokens[index])
            run.steps = step
        if on_progress is not None:
            elapsed = time.monotonic() - started
            on_progress(
                Progress(
                    step=step,
                    max_steps=total,
                    active_users=len(runs),
                    loss=sum(r.loss for r in runs) / len(runs),
                    val_loss=None,
                    tokens_per_s=float(tokens.sum()) / max(time.monotonic() - step_started, 1e-9),
                    elapsed_s=elapsed,
                    eta_s=elapsed / step * (total - step),
                )
            )
    seconds = round(time.monotonic() - started, 3)
    return [
        TrainedPrefix(
            run.user.user_id,
            run.encoder.export(),
            {k: v.detach().clone().cpu() for k, v in run.encoder.state_dict().items()},
            run.prefix,
            {
                "steps": run.steps,
                "train_loss": run.loss,
                "tokens": run.tokens,
                "train_examples": len(run.user.examples),
                "train_seconds": seconds,
            },
        )
        for run in everyone
    ]


def train_seq2seq_from_samples(
    base: BaseModel,
    users: list[UserData],
    config: TrainingConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainedPrefix]:
    """`core.training.train_prefixes` for an encoder-decoder base: same arguments, same results."""
    return train_seq2seq_prefixes(
        base, seq2seq_users(base, users, config), config, on_progress=on_progress, should_cancel=should_cancel
    )


__all__ = [
    "Seq2SeqExample",
    "Seq2SeqUser",
    "build_seq2seq_examples",
    "is_encoder_decoder",
    "seq2seq_hooks",
    "seq2seq_kv_from_text",
    "seq2seq_loss_sums",
    "seq2seq_users",
    "train_seq2seq_from_samples",
    "train_seq2seq_prefixes",
]
