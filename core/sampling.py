"""Per-row sampling: every row of a mixed batch has its own temperature, top_p and seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from core.errors import InvalidRequest


@dataclass
class SamplingParams:
    """What a request asks of decoding. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks need fixed-length outputs)."""

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be a positive integer")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest("temperature must be between 0 and 2")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidRequest("stop takes up to 4 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a (V,) logits row. The draw uses only this row's generator, so a row's
    sample does not depend on which other rows share its batch."""
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu() / params.temperature
    if torch.isnan(scaled).any() or torch.isposinf(scaled).any():
        # A temperature so small that the logits overflow (or that float32 rounds to 0): its
        # limit is greedy decoding, which is what the request asks for in effect.
        return int(torch.argmax(logits))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest set whose mass reaches top_p. The first token always stays, even
        # when top_p is below float32's smallest number (it would compare as 0 and drop all).
        drop = cumulative - sorted_probs >= params.top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
