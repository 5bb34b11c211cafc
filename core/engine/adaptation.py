"""What one user (or control) adds to a batch row, whatever trained it: a prefix KV, a LoRA, or both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.engine.lora import LoRAWeights


@dataclass
class Adaptation:
    """What one user (or control) adds to a batch row: a prefix KV (L, 2, H, P, D), a LoRA, or both."""

    kv: torch.Tensor | None = None
    lora: LoRAWeights | None = None

    def numel(self) -> int:
        return (0 if self.kv is None else self.kv.numel()) + (0 if self.lora is None else self.lora.numel())
