"""What a tuning method supplies to the one training loop (core/training.py), and the prefix method.

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

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from core.model import BaseModel
from core.prefix import (
    INIT_ACTIVATIONS,
    PrefixConfig,
    PrefixEncoder,
    batch_prefixes,
    forward_with_prefixes,
    kv_from_text,
)
from core.prompts import text_ids

if TYPE_CHECKING:
    from core.training import UserData


class TuningMethod(Protocol):
    mixes_users: bool
    """True when one forward may hold rows of different users (each seeing its own parameters)."""

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> nn.Module:
        """A fresh trainable module for `data.user_id`, on the base model's device. `train_texts` are
        the user's training samples (for data-dependent initialisation), `generator` seeds any random
        initialisation, so a user starts the same alone or beside others. With `data.resume_state`
        set the loop loads it into the module afterwards (initialisation may be skipped)."""
        ...

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, modules: list[nn.Module | None]) -> torch.Tensor:
        """ids, mask (B, T) right-padded; modules[i] is row i's user module or None (base model).
        Returns the last hidden state (B, T, hidden) at the rows' token positions."""
        ...

    def export(self, module: nn.Module):
        """What serving (or measuring) the user's adaptation needs: tensors, detached, on CPU."""
        ...


def once_per_module(modules: list[nn.Module | None], value: Callable[[nn.Module], torch.Tensor]) -> list:
    """value(m) per row, computed once per distinct module (a user's rows share one tensor, so one
    backward through it, not one per row); None rows stay None."""
    computed: dict[int, torch.Tensor] = {}
    for m in modules:
        if m is not None and id(m) not in computed:
            computed[id(m)] = value(m)
    return [None if m is None else computed[id(m)] for m in modules]


def init_tokens(tokenizer, samples: list[str], n: int) -> list[int]:
    """The first n tokens of the user's own text (samples joined if one is too short)."""
    ids: list[int] = []
    for text in samples:
        ids.extend(text_ids(tokenizer, text + "\n"))
        if len(ids) >= n:
            break
    return repeated_to(ids, n, tokenizer.eos_token_id)


def repeated_to(ids: list[int], n: int, filler: int) -> list[int]:
    """Exactly n tokens: `ids` cut, or repeated when too short (`filler` when there are none)."""
    if not ids:
        return [filler] * n
    return (ids * (n // len(ids) + 1))[:n]


def prefix_hidden_states(
    base: BaseModel, ids: torch.Tensor, mask: torch.Tensor, row_prefixes: list[torch.Tensor | None]
) -> torch.Tensor:
    """(B, T, hidden) last hidden states, row i under prefix KV row_prefixes[i] ((L, 2, H, P, D) or None)."""
    prefixes = batch_prefixes(row_prefixes, base.geometry, device=base.device, dtype=base.dtype)
    return forward_with_prefixes(base, ids, mask, prefixes, hidden_states_only=True).last_hidden_state


class PrefixMethod:
    """Prefix tuning: a PrefixEncoder per user; rows of any users share one forward."""

    mixes_users = True

    def __init__(self, base: BaseModel, config: PrefixConfig):
        self.base, self.config = base, config

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> PrefixEncoder:
        prefix = data.prefix or self.config
        init_kv = None
        if data.resume_state is None and prefix.init == INIT_ACTIVATIONS:
            init_kv = kv_from_text(self.base, init_tokens(self.base.tokenizer, train_texts, prefix.prefix_len))
        return PrefixEncoder(self.base.geometry, prefix, init_kv, generator).to(self.base.device)

    def hidden_states(self, ids, mask, modules):
        return prefix_hidden_states(self.base, ids, mask, once_per_module(modules, lambda encoder: encoder()))

    def export(self, module: PrefixEncoder) -> torch.Tensor:
        return module.export()  # (L, 2, H, P, D) fp32 on CPU
