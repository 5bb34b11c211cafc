"""The runner for encoder-decoder base models (T5, BART): the BatchRunner interface over a
Seq2SeqBatchCache (core/engine/batch_cache/seq2seq.py).

A row's prefill encodes its prompt under the encoder part of its prefix and runs the decoder's start
token under the decoder part; the row then decodes one token per step, cross-attending to its own
encoder output (right-padded and masked per row). Joining, leaving and positions are BatchRunner's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.engine.batch_cache import Prefix, Seq2SeqBatchCache
from core.engine.generation.runner import BatchRunner, RowLoRA


class Seq2SeqRunner(BatchRunner):
    """Forward passes over one running batch of an encoder-decoder model."""

    cache: Seq2SeqBatchCache | None

    def prefill(
        self, prompts: Sequence[list[int]], prefixes: Sequence[Prefix], loras: Sequence[RowLoRA] | None = None
    ) -> tuple[torch.Tensor, Seq2SeqBatchCache]:
        # LoRA rows never get here: MixedBatchGenerator.validate refuses them on encoder-decoders.
        base = self.base
        cache = Seq2SeqBatchCache.encode(
            base.model, prompts, prefixes, base.geometry, pad_token_id=base.tokenizer.pad_token_id, reserve=True
        )
        return cache.start().logits[:, -1].float(), cache

    def decode(self, last_tokens: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor(last_tokens, device=self.base.device)[:, None]  # (B, 1)
        return self.cache.decode(ids).logits[:, -1].float()
