"""Prefix tuning of encoder-decoder base models (T5, BART): examples, prefixes from text, losses, training.

A seq2seq prefix is one KV tensor (L_enc + L_dec, 2, H, P, D) (core/engine/batch_cache/seq2seq.py, Seq2SeqBatchCache):
the encoder part is in front of the source at every encoder layer, the decoder part in front of the
target at every decoder layer. It trains in the same reparameterized form as a decoder-only prefix
(core/engine/prefix.py: PrefixEncoder, KV = base + MLP(E), over the combined tensor) and exports to the
same artifact.

A user's writing becomes (source, target) pairs: the target is a chunk of the user's text, the source
what it answers or continues — a writing instruction for a sample's first chunk, the previous chunk
for the others. Many users train in one forward/backward pass; the objective is the sum over users of
each user's own token-mean loss, so each user's gradient is that of training them alone.

Training goes through the one loop of every method (core/tuners/loop.py): `Seq2SeqPrefixMethod` supplies
the rows ((source, target) pairs instead of one sequence) and scores them with the model's own logits
(T5 rescales the decoder output before its tied head, BART adds a logits bias), so the split, early
stopping, schedule and the multi-user guarantee are the loop's. The preservation term is not applied:
its anchors are samples of a decoder-only model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from core.engine.batch_cache import Prefix, Seq2SeqBatchCache, seq2seq_hooks
from core.engine.data import CHAT_INSTRUCTIONS, prepare_samples
from core.engine.model import BaseModel
from core.engine.prefix import INIT_ACTIVATIONS, PrefixEncoder
from core.engine.prompts import chat_prompt_ids, text_ids
from core.errors import InvalidTrainingData
from core.tuners.base import once_per_module
from core.tuners.prefix import PrefixMethod, init_tokens, repeated_to

if TYPE_CHECKING:
    from core.tuners.base import TrainingConfig, UserData


@dataclass
class Seq2SeqExample:
    source_ids: list[int]
    target_ids: list[int]
    """Scored tokens (ending with end-of-sequence when the text ends there)."""


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


class Seq2SeqPrefixMethod(PrefixMethod):
    """Prefix tuning of an encoder-decoder base: one PrefixEncoder per user over the combined
    (L_enc + L_dec) tensor; rows are (source, target) pairs, rows of any users share one forward."""

    preserves = False  # the preservation anchors are decoder-only samples

    def examples(self, texts: list[str], config: TrainingConfig) -> list[Seq2SeqExample]:
        return build_seq2seq_examples(self.base, texts, max(config.max_seq_len // 2, 8))

    def new_user(self, data: UserData, train_texts: list, generator: torch.Generator) -> PrefixEncoder:
        if data.companions:
            raise InvalidTrainingData("companion prefixes are not supported on encoder-decoder models yet")
        prefix = data.prefix or self.config
        init_kv = None
        if data.resume_state is None and prefix.init == INIT_ACTIVATIONS:
            init_kv = seq2seq_kv_from_text(self.base, self._init_tokens(train_texts, prefix.prefix_len))
        return PrefixEncoder(self.base.geometry, prefix, init_kv, generator).to(self.base.device)

    def _init_tokens(self, train: list, n: int) -> list[int]:
        """The first n tokens of the user's text, or of their targets when given rows, not samples."""
        if train and isinstance(train[0], Seq2SeqExample):
            return repeated_to([t for example in train for t in example.target_ids[:n]], n, _pad_id(self.base))
        return init_tokens(self.base.tokenizer, train, n)

    def loss_sums(self, rows: list[Seq2SeqExample], modules: list) -> tuple[torch.Tensor, torch.Tensor]:
        return seq2seq_loss_sums(self.base, rows, once_per_module(modules, lambda encoder: encoder()))

    def hidden_states(self, ids, mask, modules):
        raise NotImplementedError("seq2seq rows are scored by `loss_sums`, not through the decoder-only LM head")


__all__ = [
    "Seq2SeqExample",
    "Seq2SeqPrefixMethod",
    "build_seq2seq_examples",
    "is_encoder_decoder",
    "seq2seq_hooks",
    "seq2seq_kv_from_text",
    "seq2seq_loss_sums",
]
