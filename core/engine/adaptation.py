"""What one user (or control) adds to a batch row, whatever trained it: a prefix KV, a LoRA, or both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.engine.batch_cache import compose as compose_kv
from core.engine.lora import LoRAWeights
from core.engine.lora import compose as compose_lora


@dataclass
class Adaptation:
    """What one user (or control) adds to a batch row: a prefix KV (L, 2, H, P, D), a LoRA, or both."""

    kv: torch.Tensor | None = None
    lora: LoRAWeights | None = None

    def numel(self) -> int:
        return (0 if self.kv is None else self.kv.numel()) + (0 if self.lora is None else self.lora.numel())


def row_parts(parts: Sequence[Adaptation | torch.Tensor]) -> tuple[list[torch.Tensor] | None, list[LoRAWeights] | None]:
    """A row's (prefix, lora) from its composed parts, in order: the KV of each part that has one
    (concatenated, in that order, by the batch) and the LoRA of each part that has one (summed by
    the batch), so a user's LoRA composes with controls' prefixes. None: none at all."""
    kvs, loras = [], []
    for part in parts:
        if isinstance(part, torch.Tensor):
            kvs.append(part)
            continue
        if part.kv is not None:
            kvs.append(part.kv)
        if part.lora is not None:
            loras.append(part.lora)
    return kvs or None, loras or None


def composed(parts: Sequence[Adaptation | torch.Tensor]) -> Adaptation:
    """Parts as the one adaptation a row serves them as: KVs concatenated in order, LoRAs summed."""
    kvs, loras = row_parts(parts)
    return Adaptation(compose_kv(kvs), compose_lora(loras))
