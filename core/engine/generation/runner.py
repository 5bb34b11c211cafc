"""The runner: executes a step's forward passes over the batch's `BatchCache`. Model calls only.

It knows rows by their index in the running batch; what a row is for (its request, its text) is
the generator's business. Every pass returns one logits row per batch row, (B, V) float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.engine import lora
from core.engine.batch_cache import BatchCache, Prefix
from core.engine.lora import LoRABatch, LoRAWeights
from core.engine.model import BaseModel

RowLoRA = LoRAWeights | Sequence[LoRAWeights] | None
"""One row's LoRA: none, one, or several composed (core/engine/lora.py)."""


class BatchRunner:
    """Forward passes over one running batch of rows, each with its own (composed) prefix and LoRA."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.cache: BatchCache | None = None
        self._loras: list[RowLoRA] = []  # the running rows' LoRAs, in row order
        self._lora_batch: LoRABatch | None = None  # gathered from `_loras` when rows join or leave

    @property
    def rows(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    def prefill(
        self, prompts: Sequence[list[int]], prefixes: Sequence[Prefix], loras: Sequence[RowLoRA] | None = None
    ) -> tuple[torch.Tensor, BatchCache]:
        """Run new rows' prefixes + prompts in one pass, each row under its own LoRA (if any);
        returns their last-token logits (N, V) and their cache, which `join` adds to the running
        batch (with the same `loras`)."""
        base = self.base
        device = base.device
        cache = BatchCache.from_prefixes(prefixes, base.geometry, device=device, dtype=base.dtype, reserve=True)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), base.tokenizer.pad_token_id, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):  # left padding: every row's last token is the last column
            ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[i, width - len(prompt) :] = 1
        with lora.active(base.model, self._gather(loras or [None] * len(prompts))):
            out = base.model(**cache.model_inputs(ids, mask), logits_to_keep=1)
        return out.logits[:, -1].float(), cache

    def join(self, cache: BatchCache, rows: Sequence[int], loras: Sequence[RowLoRA] | None = None) -> None:
        """Add `rows` of a prefilled cache to the running batch (after the rows already there);
        `loras` are the prefilled rows' LoRAs, as given to `prefill`."""
        loras = list(loras or [None] * cache.batch_size)
        if len(rows) != cache.batch_size:
            cache.keep_rows(rows)
        if self.cache is None or self.cache.batch_size == 0:
            self.cache, self._loras = cache, []
        else:
            self.cache.append_rows(cache)
        self._loras += [loras[i] for i in rows]
        self._lora_batch = self._gather(self._loras)

    def decode(self, last_tokens: Sequence[int]) -> torch.Tensor:
        """Feed each running row its last token; returns next-token logits (B, V)."""
        ids = torch.tensor(last_tokens, device=self.base.device)[:, None]  # (B, 1)
        with lora.active(self.base.model, self._lora_batch):
            out = self.base.model(**self.cache.model_inputs(ids), logits_to_keep=1)
        return out.logits[:, -1].float()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` of the running batch (finished rows leave)."""
        if not rows:
            self.cache, self._loras, self._lora_batch = None, [], None
        elif len(rows) != self.cache.batch_size:
            self.cache.keep_rows(rows)
            self._loras = [self._loras[i] for i in rows]
            self._lora_batch = self._gather(self._loras)

    def _gather(self, loras: Sequence[RowLoRA]) -> LoRABatch | None:
        return LoRABatch.from_rows(loras, device=self.base.device, dtype=self.base.dtype)

    def next_positions(self) -> list[int]:
        return [] if self.cache is None else self.cache.next_position.tolist()
