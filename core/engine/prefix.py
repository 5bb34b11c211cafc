"""A prefix: trainable key/value vectors placed before the real tokens at every attention layer.

Shapes used throughout (L layers, H key/value heads, P prefix length, D head dim):

    prefix KV        (L, 2, H, P, D)     index 0 = keys, 1 = values; what is exported and served
    batched KV       (L, 2, B, H, Pmax, D) rows left-padded to the longest prefix in the batch

Keys are stored *as the attention layer sees them*, i.e. already position-encoded: a prefix taken from
real activations is exactly the cache the model would have built for that text, and the real tokens
that follow take positions P, P+1, ... so relative positions stay what they would be in running text.

Training uses the reparameterization of Li & Liang (2021): KV = base + MLP(E), with E a small
(P, d) embedding and a 2-layer tanh MLP. Only the final KV tensor is needed to serve; the MLP state is
kept in a separate optional artifact so training can continue where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from core.engine.batch_cache import BatchCache, Prefix
from core.engine.model import BaseModel, PrefixGeometry

INIT_RANDOM = "random"
INIT_ACTIVATIONS = "activations"


@dataclass
class PrefixConfig:
    """How one user's prefix is parameterized while it trains."""

    prefix_len: int = 16
    """Number of virtual tokens per layer."""
    reparameterize: bool = True
    """Train through an embedding + 2-layer tanh MLP (the paper's stabiliser) instead of the raw KV."""
    embedding_dim: int = 512
    """Width of the reparameterization embedding E (P, embedding_dim)."""
    hidden_dim: int = 512
    """Hidden width of the reparameterization MLP (the paper used 512 and 800)."""
    init: str = INIT_ACTIVATIONS
    """'activations': start from the KV the frozen model builds for a piece of the user's own text;
    'random': start from a randomly initialised MLP output."""

    def to_dict(self) -> dict:
        return asdict(self)


class PrefixEncoder(nn.Module):
    """Training form of one user's prefix. `forward()` returns the prefix KV (L, 2, H, P, D)."""

    def __init__(
        self,
        geometry: PrefixGeometry,
        config: PrefixConfig,
        init_kv: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.geometry = geometry
        self.config = config
        P = config.prefix_len
        shape = (geometry.num_layers, 2, geometry.num_kv_heads, P, geometry.head_dim)
        self.kv_shape = shape
        start = init_kv.detach().float().clone() if init_kv is not None else None
        if start is not None and tuple(start.shape) != shape:
            raise ValueError(f"init KV has shape {tuple(start.shape)}, expected {shape}")

        if not config.reparameterize:
            if start is None:
                start = torch.randn(shape, generator=generator) * 0.5
            self.kv = nn.Parameter(start)
            return

        out_features = geometry.num_layers * 2 * geometry.num_kv_heads * geometry.head_dim
        self.embedding = nn.Parameter(torch.randn(P, config.embedding_dim, generator=generator) * 0.02)
        self.up = nn.Linear(config.embedding_dim, config.hidden_dim)
        self.down = nn.Linear(config.hidden_dim, out_features)
        _init_linear(self.up, generator)
        if start is None:
            _init_linear(self.down, generator)
            start = torch.zeros(shape)
        else:
            # Start exactly at the activations: the MLP learns a correction from zero (as LoRA's B = 0).
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)
        self.register_buffer("base", start)

    def forward(self) -> torch.Tensor:
        if not self.config.reparameterize:
            return self.kv
        L, _, H, P, D = self.kv_shape
        delta = self.down(torch.tanh(self.up(self.embedding)))  # (P, L*2*H*D)
        delta = delta.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
        return self.base + delta

    @torch.no_grad()
    def export(self) -> torch.Tensor:
        """The final KV tensor, detached, fp32, on CPU: everything serving needs."""
        return self.forward().detach().float().cpu().contiguous()


def _init_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    bound = 1.0 / layer.in_features**0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def kv_from_text(base: BaseModel, token_ids: list[int]) -> torch.Tensor:
    """The KV the frozen model builds for `token_ids`, as a prefix (L, 2, H, len, D), fp32 on CPU."""
    cache = batch_prefixes([None], base.geometry, device=base.device, dtype=base.dtype)
    base.model(**cache.model_inputs(torch.tensor([token_ids], device=base.device)), logits_to_keep=1)
    return cache.row_kv(0).float().cpu()


def batch_prefixes(
    rows: Sequence[Prefix],
    geometry: PrefixGeometry,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> BatchCache:
    """A batch cache holding each row's prefix (one KV (L, 2, H, P_i, D), several composed in order,
    or None), left-padded to the longest. Differentiable: gradients flow back to each row's own
    prefix, which is what lets one forward/backward pass train many users at once."""
    return BatchCache.from_prefixes(rows, geometry, device=device, dtype=dtype)


def forward_with_prefixes(
    base: BaseModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefixes: BatchCache,
    *,
    logits_to_keep: int = 0,
    hidden_states_only: bool = False,
):
    """One forward pass where row i sees its own prefix before its tokens.

    `input_ids`/`attention_mask` are (B, T); padding may sit on either side. Positions of real tokens
    start at each row's own prefix length, so a row's result does not depend on its neighbours.
    Returns the model output (`.logits`; `prefixes` now also holds the tokens' K/V), or with
    `hidden_states_only` the decoder's output (`.last_hidden_state`) so a caller can apply the LM head
    to the positions it scores only.
    """
    inputs = prefixes.model_inputs(input_ids, attention_mask)
    if hidden_states_only:
        return base.model.base_model(**inputs)
    return base.model(**inputs, logits_to_keep=logits_to_keep)


def prefix_hidden_states(base: BaseModel, ids: torch.Tensor, mask: torch.Tensor, row_prefixes: list) -> torch.Tensor:
    """(B, T, hidden) last hidden states, row i under row_prefixes[i]: a KV (L, 2, H, P, D), several
    composed in order, or None."""
    prefixes = batch_prefixes(row_prefixes, base.geometry, device=base.device, dtype=base.dtype)
    return forward_with_prefixes(base, ids, mask, prefixes, hidden_states_only=True).last_hidden_state
