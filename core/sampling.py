"""Per-row sampling: every row of a mixed batch has its own temperature, top_p and seeded generator,
and the batch is sampled in one vectorised pass."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of `logits` (B, V), each row with its own parameters and generator.

    Vectorised over the batch: one argmax for the greedy rows, one softmax / sort / cumsum for the
    sampled ones. Each sampled row draws a single uniform number from its *own* generator and picks
    its token by inverse CDF, so a row's sample does not depend on which other rows share its batch.
    """
    tokens = logits.argmax(dim=-1)  # (B,): greedy rows are done
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], dtype=torch.float32)
        top_p = torch.tensor([params[i].top_p for i in sampled], dtype=torch.float32)
        draws = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled])  # (S,)
        scaled = logits.index_select(0, index).float().cpu() / temperature[:, None]  # (S, V)
        picked = _inverse_cdf(torch.softmax(scaled, dim=-1), top_p, draws)
        # A temperature so small that the logits overflow (or that float32 rounds to 0): its limit
        # is greedy decoding, which is what the request asks for in effect.
        overflow = torch.isnan(scaled).any(dim=-1) | torch.isposinf(scaled).any(dim=-1)
        tokens = tokens.cpu()
        tokens[index.cpu()] = torch.where(overflow, tokens[index.cpu()], picked)
    return tokens.tolist()


def _inverse_cdf(probs: torch.Tensor, top_p: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` (S, V): the token at which the cumulative mass of the row's top-p nucleus,
    summed in vocabulary order, first exceeds the row's uniform draw.

    Vocabulary order, not probability order: a float-level change of the logits (another batch
    shape) then moves the boundaries by as much and almost never changes the token, whereas in
    sorted order near-ties reorder and the same draw lands on an unrelated token.
    """
    kept = probs
    if bool((top_p < 1.0).any()):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (S, V)
        # Keep the smallest set whose mass reaches top_p. The most likely token always stays, even
        # when top_p is below float32's smallest number (it would compare as 0 and drop all).
        drop_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
        drop_sorted[:, 0] = False
        kept = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
    cumulative = torch.cumsum(kept, dim=-1)  # (S, V)
    target = draws[:, None] * cumulative[:, -1:]  # (S, 1), strictly below each row's kept mass
    position = torch.searchsorted(cumulative, target, right=True).clamp(max=probs.shape[-1] - 1)
    # Rounding may still leave a row past its last kept token: take that token instead.
    last_kept = probs.shape[-1] - 1 - (kept > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    landed_on_kept = kept.gather(1, position) > 0
    return torch.where(landed_on_kept, position, last_kept).squeeze(1)
