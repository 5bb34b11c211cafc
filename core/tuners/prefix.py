"""What a tuning method supplies to the one training loop (core/tuners/loop.py), and the prefix method.

A method owns only what differs between methods: each user's trainable parameters (an nn.Module)
and how they enter the frozen model's forward pass. Everything else — data split, batching,
schedule, epochs, time budget, cancellation, early stopping with best-checkpoint restore, the
preservation term, per-user token-mean losses, progress — is the loop's, once for every method.

The loop gives a method right-padded token rows and, per row, the module of the user the row
belongs to (None = the bare base model). The method returns the last hidden state at every token
position; the loop applies the base model's (frozen, shared) LM head only where a token is scored.
A method whose forward can mix users (prefixes, soft prompts) gets rows of many users at once; one
that cannot (PEFT LoRA: one active adapter per forward) sets `mixes_users = False` and the loop
calls it with rows of one user at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from core.engine import lora
from core.engine.data import prepare_samples
from core.engine.lora import LoRABatch, LoRAWeights
from core.engine.model import BaseModel
from core.engine.prefix import (
    INIT_ACTIVATIONS,
    PrefixConfig,
    PrefixEncoder,
    kv_from_text,
    prefix_hidden_states,
)
from core.engine.prompts import text_ids
from core.tuners.base import once_per_module

if TYPE_CHECKING:
    from core.tuners.base import UserData


def init_tokens(tokenizer, samples: list[str], n: int) -> list[int]:
    """The first n tokens of the user's own text (samples joined if one is too short)."""
    ids: list[int] = []
    for text in samples:
        ids.extend(text_ids(tokenizer, text + "\n"))
        if len(ids) >= n:
            break
    return repeated_to(ids, n, tokenizer.eos_token_id)


@torch.no_grad()
def instant_prefix(base: BaseModel, samples: list[str], prefix_len: int) -> torch.Tensor:
    """A usable prefix with no gradient step ("version 0"): the KV the frozen model builds for the
    first `prefix_len` tokens of the user's own text, i.e. where an activations-initialised prefix
    starts training. (L, 2, H, P, D) fp32 on CPU."""
    return kv_from_text(base, init_tokens(base.tokenizer, prepare_samples(samples), prefix_len))


def repeated_to(ids: list[int], n: int, filler: int) -> list[int]:
    """Exactly n tokens: `ids` cut, or repeated when too short (`filler` when there are none)."""
    if not ids:
        return [filler] * n
    return (ids * (n // len(ids) + 1))[:n]


class PrefixMethod:
    """Prefix tuning: a PrefixEncoder per user; rows of any users share one forward.

    A user with `companions` (frozen prefixes, e.g. other users' prefixes under a control prefix
    being trained) sees one of them composed before its own prefix in every row, taken in turn from
    its own cycle, so the prefix learns to work beside prefixes like those it will be served with.
    The cycle is the user's own: rows draw the same companions alone or beside other users."""

    mixes_users = True

    def __init__(self, base: BaseModel, config: PrefixConfig):
        self.base, self.config = base, config
        self._companions: dict[int, _Companions] = {}  # id(module) -> that user's frozen companions

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> PrefixEncoder:
        prefix = data.prefix or self.config
        init_kv = None
        if data.resume_state is None and prefix.init == INIT_ACTIVATIONS:
            init_kv = kv_from_text(self.base, init_tokens(self.base.tokenizer, train_texts, prefix.prefix_len))
        encoder = PrefixEncoder(self.base.geometry, prefix, init_kv, generator).to(self.base.device)
        if data.companions:
            self._companions[id(encoder)] = _Companions(data.companions, self.base)
        return encoder

    def hidden_states(self, ids, mask, modules):
        own = once_per_module(modules, lambda encoder: encoder())
        rows = [
            kv if m is None or id(m) not in self._companions else (self._companions[id(m)].next(), kv)
            for m, kv in zip(modules, own)
        ]
        stored_loras = [getattr(m, "lora_weights", None) for m in modules]  # a stored version's LoRA
        batch = LoRABatch.from_rows(stored_loras, device=self.base.device, dtype=self.base.dtype)
        with lora.active(self.base.model, batch):
            return prefix_hidden_states(self.base, ids, mask, rows)

    def export(self, module: PrefixEncoder) -> torch.Tensor:
        return module.export()  # (L, 2, H, P, D) fp32 on CPU

    def stored_user(self, data: UserData, stored) -> nn.Module:
        """A stored version of `data`'s user (a prefix KV, or an Adaptation of any method) as a
        frozen user module: scored exactly like the user's trainable prefix, beside the user's
        companions (a cycle of its own, so scoring it never shifts the companions the trainable
        prefix sees) unless it holds its own (`reference_composed`)."""
        kv, weights = stored_parts(stored, self.base)
        module = StoredPrefix(kv, weights)
        if data.companions and not data.reference_composed:
            self._companions[id(module)] = _Companions(data.companions, self.base)
        return module


class StoredPrefix(nn.Module):
    """A fixed prefix KV (L, 2, H, P, D) in a trainable prefix's place: calling it returns the KV.
    `lora_weights`: a stored version may also carry a LoRA (methods lora, pt-peft), applied to its
    rows, so a version of any method is scored against a new prefix on equal terms."""

    def __init__(self, kv: torch.Tensor | None, lora_weights: LoRAWeights | None = None):
        super().__init__()
        self.register_buffer("kv", kv)
        self.lora_weights = lora_weights

    def forward(self) -> torch.Tensor | None:
        return self.kv


class _Companions:
    """One user's frozen companion prefixes, handed out in turn."""

    def __init__(self, kvs: list[torch.Tensor], base: BaseModel):
        self.kvs = [kv.to(base.device, base.dtype) for kv in kvs]
        self.turn = 0

    def next(self) -> torch.Tensor:
        kv = self.kvs[self.turn % len(self.kvs)]
        self.turn += 1
        return kv


def stored_parts(stored, base: BaseModel) -> tuple[torch.Tensor | None, LoRAWeights | None]:
    """(KV, LoRA) of a stored version on the base model's device: a KV tensor, or anything with
    `kv` and `lora` (core/tuners/registry.py's Adaptation)."""
    if isinstance(stored, torch.Tensor):
        return stored.to(base.device), None
    kv = None if stored.kv is None else stored.kv.to(base.device)
    return kv, None if stored.lora is None else stored.lora.to(base.device, base.dtype)
