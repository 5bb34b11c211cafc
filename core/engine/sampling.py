"""Per-row sampling: every row of a mixed batch has its own temperature, top_p, frequency and
presence penalties and seeded generator, and the batch is sampled in one vectorised pass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from core.errors import InvalidRequest

MAX_STYLE_STRENGTH = 2.0


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
    frequency_penalty: float = 0.0
    """OpenAI's: each token's logit is lowered by this times the number of times the row has
    generated it so far (negative values favour repeats)."""
    presence_penalty: float = 0.0
    """OpenAI's: lowered by this once a row has generated the token at all."""
    no_repeat_ngram: int = 0
    """With n > 0, a token that would complete an n-gram this row has already written is never
    chosen (transformers' `no_repeat_ngram_size`, per row): loops of n tokens cannot happen. 0: off."""
    style_strength: float = 1.0
    """How strongly a row's prefix (and LoRA) apply, by guidance against the base model: the row
    decodes from logits = base + s * (personalised - base), the base model's row run beside it in
    the same batch. 1 is the personalised row alone, 0 the base model's answer, above 1 amplifies
    the difference. A row without a prefix ignores it."""

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be a positive integer")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest("temperature must be between 0 and 2")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidRequest("stop takes up to 4 non-empty strings")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be between -2 and 2")
        if not isinstance(self.no_repeat_ngram, int) or not 0 <= self.no_repeat_ngram <= 16:
            raise InvalidRequest("no_repeat_ngram must be an integer between 0 and 16")
        if not math.isfinite(self.style_strength) or not 0.0 <= self.style_strength <= MAX_STYLE_STRENGTH:
            raise InvalidRequest(f"style_strength must be between 0 and {MAX_STYLE_STRENGTH:g}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.no_repeat_ngram > 0


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    generated: Sequence[Sequence[int]] = (),
) -> list[int]:
    """One token per row of `logits` (B, V), each row with its own parameters and generator, and
    (for rows with a frequency or presence penalty) the tokens it has `generated` so far.

    Vectorised over the batch: one argmax for the greedy rows; for the sampled ones one softmax and
    sort (top-p), then the Gumbel-max trick, argmax(logits / T + G) with G drawn from the row's *own*
    generator, which samples exactly from softmax(logits / T). Unlike an inverse-CDF draw (what
    `torch.multinomial` does), whose 49k cumulative boundaries each move with float-level changes of
    the logits (another batch shape: measured ~2% of tokens flipped on SmolLM2), Gumbel-max changes
    its pick only if the two best perturbed scores are within that rounding: a row's sample does not
    depend on which other rows share its batch.
    """
    logits = _penalized(logits, params, generated)
    tokens = logits.argmax(dim=-1).cpu()  # (B,): greedy rows are done
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled)
        temperature = torch.tensor([params[i].temperature for i in sampled], dtype=torch.float32)
        top_p = torch.tensor([params[i].top_p for i in sampled], dtype=torch.float32)
        scaled = logits.index_select(0, index.to(logits.device)).float().cpu() / temperature[:, None]  # (S, V)
        # A temperature so small that the logits overflow (or that float32 rounds to 0): its limit
        # is greedy decoding, which is what the request asks for in effect.
        overflow = torch.isnan(scaled).any(dim=-1) | torch.isposinf(scaled).any(dim=-1)
        scaled = _outside_nucleus_removed(scaled.nan_to_num(), top_p)
        uniform = torch.stack([torch.rand(scaled.shape[1], generator=generators[i]) for i in sampled])  # (S, V)
        gumbel = -torch.log(-torch.log(uniform))
        picked = (scaled + gumbel).argmax(dim=-1)
        tokens[index] = torch.where(overflow, tokens[index], picked)
    return tokens.tolist()


def _penalized(
    logits: torch.Tensor, params: Sequence[SamplingParams], generated: Sequence[Sequence[int]]
) -> torch.Tensor:
    """`logits` with OpenAI's penalties applied to the rows that ask for them, from each row's own
    generated tokens only (so a row's result still never depends on its batch); the others untouched."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    if len(generated) != len(params):
        raise ValueError("penalized rows need every row's generated tokens")
    counts = torch.zeros(len(rows), logits.shape[-1], dtype=logits.dtype, device=logits.device)
    for slot, i in enumerate(rows):
        if generated[i]:
            ids = torch.tensor(generated[i], device=logits.device)
            counts[slot].index_add_(0, ids, torch.ones(len(ids), dtype=logits.dtype, device=logits.device))
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], dtype=logits.dtype, device=logits.device)
    presence = torch.tensor([params[i].presence_penalty for i in rows], dtype=logits.dtype, device=logits.device)
    index = torch.tensor(rows, device=logits.device)
    penalty = counts * frequency[:, None] + (counts > 0).to(logits.dtype) * presence[:, None]
    for slot, i in enumerate(rows):
        banned = _repeating_tokens(generated[i], params[i].no_repeat_ngram)
        if banned:
            penalty[slot, torch.tensor(banned, device=logits.device)] = float("inf")
    return logits.index_copy(0, index, logits.index_select(0, index) - penalty)


def _repeating_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram `tokens` already holds (none when n is 0)."""
    if n <= 0 or len(tokens) < n:
        return []
    context = tuple(tokens[len(tokens) - n + 1 :])
    return sorted({tokens[k + n - 1] for k in range(len(tokens) - n + 1) if tuple(tokens[k : k + n - 1]) == context})


def _outside_nucleus_removed(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of `scaled` logits (S, V): -inf outside the smallest set of most likely tokens whose
    probability reaches the row's top_p."""
    if not bool((top_p < 1.0).any()):
        return scaled
    sorted_probs, order = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True)  # (S, V)
    drop_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
    # The most likely token always stays, even when top_p is below float32's smallest number (it
    # would compare as 0 and drop all).
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))
