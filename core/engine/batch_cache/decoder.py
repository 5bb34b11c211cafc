"""BatchCache: the one owner of a batch's key/value cache, attention mask and positions.

Every row of a batch carries a *prefix part* and a *token part*. The prefix part is zero or more
adapters' KV composed in order — e.g. a shared population prefix, then the user's own, then attribute
prefixes — each (L, 2, H, P_i, D); the row's prefix is their concatenation along P. The token part is
the K/V of every token the model has seen for that row.

Layout (L layers, B rows, H key/value heads, S cache columns shared by all rows, D head dim):

    keys, values per layer   (B, H, S, D)   a row's columns are right-aligned; padding sits on the left
    mask                     (B, S)         1 where a column is real for that row, 0 = padding
    next_position            (B,)           the position the row's next token takes

Keys are stored as the attention layer sees them (already position-encoded), so a prefix taken from
real activations is exactly the cache the model would have built for that text; a row's real tokens
take positions P, P+1, ... after its own prefix of length P, whatever its neighbours' widths, and its
padding columns stay masked for it in every later pass. That is what makes a row's result independent
of the batch it shares.

This package (this module and seq2seq.py) is the only code that knows transformers' cache classes.
In generation the per-layer tensors keep spare columns at the end, so a decoding step writes one
column in place instead of re-concatenating the whole cache (transformers' DynamicLayer does a `torch.cat` per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from core.engine.model import PrefixGeometry

Prefix = torch.Tensor | Sequence[torch.Tensor] | None
"""One row's prefix: None (the base model), one KV (L, 2, H, P, D), or several composed in order."""

_SPARE_COLUMNS = 64
"""Columns reserved beyond the current width when a generation cache grows (amortises reallocation)."""


def compose(prefix: Prefix) -> torch.Tensor | None:
    """A row's prefix as one KV tensor (L, 2, H, P, D): composed adapters concatenated in order."""
    if prefix is None or isinstance(prefix, torch.Tensor):
        return prefix
    parts = [p for p in prefix if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)


def prefix_length(prefix: Prefix) -> int:
    """Virtual tokens a row's prefix puts in front of its input (0 for the base model)."""
    if prefix is None:
        return 0
    if isinstance(prefix, torch.Tensor):
        return prefix.shape[3]
    return sum(p.shape[3] for p in prefix if p is not None)


class _ReservedLayer(DynamicLayer):
    """A cache layer whose tensors are views of buffers with spare columns at the end.

    `update` writes new columns into the spare space when it can (inference); when gradients must
    flow to the cached prefix (training) it concatenates, as transformers' own layer does.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 0):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self.hold(keys, values, spare)

    def hold(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        """Hold these (B, H, S, D) tensors, copied into buffers with `spare` free columns if > 0."""
        self._start = 0  # where `keys` begins inside the buffer (trimming moves it forward)
        if spare == 0:
            self._key_buffer = self._value_buffer = None
            self.keys, self.values = keys, values
            return
        B, H, S, D = keys.shape
        self._key_buffer = keys.new_empty(B, H, S + spare, D)
        self._value_buffer = values.new_empty(B, H, S + spare, D)
        self._key_buffer[:, :, :S] = keys
        self._value_buffer[:, :, :S] = values
        self._expose(S)

    def _expose(self, end: int) -> None:
        self.keys = self._key_buffer[:, :, self._start : end]
        self.values = self._value_buffer[:, :, self._start : end]

    def drop_leading(self, n: int) -> None:
        """Forget the first n columns (views: the spare columns at the end stay reserved)."""
        self._start += n
        self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[2]
        differentiable = torch.is_grad_enabled() and (key_states.requires_grad or self.keys.requires_grad)
        if differentiable or self._key_buffer is None:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            return self.keys, self.values
        end = self._start + self.keys.shape[2]
        if end + new > self._key_buffer.shape[2]:
            self.hold(self.keys, self.values, max(_SPARE_COLUMNS, new))
            end = self.keys.shape[2]
        self._key_buffer[:, :, end : end + new] = key_states
        self._value_buffer[:, :, end : end + new] = value_states
        self._expose(end + new)
        return self.keys, self.values


class _LayeredKV(DynamicCache):
    """transformers' cache interface over our own layers."""

    def __init__(self, layers: list[_ReservedLayer]):
        Cache.__init__(self, layers=layers)


class BatchCache:
    """K/V, attention mask and positions of every row of one batch (see the module docstring)."""

    def __init__(self, layers: list[_ReservedLayer], mask: torch.Tensor, next_position: torch.Tensor, spare: int):
        self._layers = layers
        self._kv = _LayeredKV(layers)
        self.mask = mask  # (B, S)
        self.next_position = next_position  # (B,)
        self._spare = spare

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_prefixes(
        cls,
        rows: Sequence[Prefix],
        geometry: PrefixGeometry,
        *,
        device: torch.device,
        dtype: torch.dtype,
        reserve: bool = False,
    ) -> BatchCache:
        """A cache holding each row's (composed) prefix, left-padded to the longest.

        Differentiable: gradients flow back to each row's own prefix tensors, which is what lets one
        forward/backward pass train many users at once. `reserve` keeps spare columns for decoding.
        """
        kvs = [compose(p) for p in rows]
        lengths = [0 if kv is None else kv.shape[3] for kv in kvs]
        p_max = max(lengths, default=0)
        L, H, D = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
        mask = torch.zeros(len(kvs), p_max, dtype=torch.long, device=device)
        padded = []
        for i, (kv, n) in enumerate(zip(kvs, lengths)):
            mask[i, p_max - n :] = 1
            if kv is None:
                padded.append(torch.zeros(L, 2, H, p_max, D, device=device, dtype=dtype))
            else:
                padded.append(F.pad(kv.to(device=device, dtype=dtype), (0, 0, p_max - n, 0)))
        stacked = torch.stack(padded, dim=2) if padded else torch.zeros(L, 2, 0, H, 0, D, device=device, dtype=dtype)
        spare = _SPARE_COLUMNS if reserve else 0
        layers = [_ReservedLayer(stacked[layer, 0], stacked[layer, 1], spare) for layer in range(L)]  # (B, H, P, D)
        positions = torch.tensor(lengths, dtype=torch.long, device=device)
        return cls(layers, mask, positions, spare)

    # -- running the model ------------------------------------------------------------------------

    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Keyword arguments for the forward pass that feeds `input_ids` (B, T) to every row.

        Padding may sit on either side of `attention_mask` (B, T). The pass appends T columns to the
        cache, so the mask and positions here advance with it: call the model with exactly these.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.mask.dtype)
        positions = self.next_position[:, None] + (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        self.mask = torch.cat([self.mask, attention_mask], dim=1)
        self.next_position = self.next_position + attention_mask.sum(dim=1)
        return dict(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self._kv,
            use_cache=True,
        )

    # -- rows joining, leaving, and unused columns ------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then drop the columns none of them uses."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        for layer in self._layers:
            layer.hold(layer.keys.index_select(0, index), layer.values.index_select(0, index), self._spare)
        self.trim()

    def append_rows(self, other: BatchCache) -> None:
        """Add `other`'s rows after this cache's, left-padding whichever side is narrower."""
        width = max(self.width, other.width)
        mine, theirs = width - self.width, width - other.width
        self.mask = torch.cat([F.pad(self.mask, (mine, 0)), F.pad(other.mask, (theirs, 0))])
        self.next_position = torch.cat([self.next_position, other.next_position])
        for layer, new in zip(self._layers, other._layers):
            keys = torch.cat([_left_pad(layer.keys, mine), _left_pad(new.keys, theirs)])
            values = torch.cat([_left_pad(layer.values, mine), _left_pad(new.values, theirs)])
            layer.hold(keys, values, self._spare)
        self.trim()

    def trim(self) -> None:
        """Drop leading columns no row uses (departed rows, shared padding)."""
        if self.batch_size == 0:
            return
        first = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self._layers:
                layer.drop_leading(first)

    def row_kv(self, row: int) -> torch.Tensor:
        """Row `row`'s real columns as a prefix KV (L, 2, H, n, D): what it has seen, reusable as a prefix."""
        real = self.mask[row].bool()
        return torch.stack(
            [torch.stack([layer.keys[row][:, real], layer.values[row][:, real]]) for layer in self._layers]
        )


def _left_pad(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a (B, H, S, D) cache tensor with n zero columns on the left of S."""
    return F.pad(tensor, (0, 0, n, 0)) if n else tensor
