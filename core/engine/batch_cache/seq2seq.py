"""Seq2SeqBatchCache: the batch of an encoder-decoder model (T5, BART) with per-row prefixes,
Li & Liang's [PREFIX; x; PREFIX'; y].

A seq2seq prefix is still one KV tensor (L_enc + L_dec, 2, H, P, D): its first L_enc layers sit in
front of the encoder's input (encoder self-attention, every layer), the rest in front of the
decoder's (decoder self-attention, every layer). Artifacts, the registry, the prefix cache and
composition along P are unchanged; a composed row is split after composing.

The decoder part is an ordinary BatchCache (the self-attention half of transformers'
EncoderDecoderCache); the cross-attention half is filled by the model at the first decoder pass and
then kept row by row beside each row's encoder output. transformers' encoders take no cache, so the
encoder part enters through the attention-function registry: the model runs with our registered
implementation (sdpa underneath), which, for the encoder's self-attention modules only and only
inside an encoder pass that carries prefixes, puts each row's prefix K/V in front of the keys and
values. Every other attention call is plain sdpa, so a model without prefixes computes as before.

Positions, per family:
- T5 (relative bias, computed from cache columns): each row's real columns are kept contiguous
  (prefix left-padded, tokens right-padded in the encoder; the decoder feeds one token per row per
  pass), so a prefix column gets the bias of a token standing that far before the text, as in running
  text (and as transformers' T5 did with past key/values). Rows do not see each other's widths.
- BART (learned absolute positions): a row's tokens take positions 0, 1, ... whatever its prefix
  (Li & Liang's BART setup), set per row through a forward hook on the position embedding, because
  BART's stacks accept no position ids and would otherwise count the batch's padded cache width.
  Measured on a toy BART trained in tests/test_engine_seq2seq.py (positions 0..5 seen in training):
  a 4-token prefix taught to reverse reached 0.88 exact match with tokens at 0, 1, ...; 0.02 with
  tokens after the prefix (P, P + 1, ...: positions the model had not learned). The other rule,
  `positions_after_prefix = True`, makes a prefix taken from text exactly a continuation of it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from core.engine.batch_cache.decoder import BatchCache, Prefix, _LayeredKV, _ReservedLayer, compose
from core.engine.model import PrefixGeometry

_SEQ2SEQ_ATTENTION = "steer_seq2seq"
_SUPPORTED_ATTENTION = ("T5Attention", "BartAttention")


@dataclass
class _EncoderPrefix:
    """One encoder pass's prefixes: per encoder layer (B, H, P, D) keys and values, left-padded."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor  # (B, 1, 1, P + T) bool: prefix columns, then the tokens
    width: int  # P
    layer_of: dict[int, int]  # id(encoder self-attention module) -> encoder layer
    capture: list | None = None  # if a list: each encoder layer appends its tokens' (keys, values)
    bias: torch.Tensor | None = None  # T5: the relative bias over prefix + token columns (layer 0 makes it)


@dataclass
class _Pass:
    encoder: _EncoderPrefix | None = None
    positions: dict[int, torch.Tensor] = field(default_factory=dict)  # id(position embedding) -> (B, T)


_PASS: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar("steer_seq2seq_pass", default=None)


@contextmanager
def _running(state: _Pass):
    token = _PASS.set(state)
    try:
        yield
    finally:
        _PASS.reset(token)


def _seq2seq_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, except in an encoder pass with prefixes: the row's prefix K/V go in front of the keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _PASS.get()
    encoder = None if state is None else state.encoder
    layer = None if encoder is None else encoder.layer_of.get(id(module))
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if encoder.capture is not None:
        encoder.capture.append((key, value))
    if encoder.width == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    key = torch.cat([encoder.keys[layer].to(key.dtype), key], dim=2)
    value = torch.cat([encoder.values[layer].to(value.dtype), value], dim=2)
    if kwargs.get("position_bias") is not None:  # T5: computed by layer 0 (the only one with the table)
        if encoder.bias is None:
            encoder.bias = module.compute_bias(
                query.shape[2], key.shape[2], device=query.device, past_seen_tokens=encoder.width
            )
        kwargs["position_bias"] = encoder.bias
    return sdpa_attention_forward(module, query, key, value, encoder.key_mask, **kwargs)


@dataclass
class _Seq2SeqHooks:
    """What the engine installed on one encoder-decoder model."""

    encoder_layers: int
    decoder_layers: int
    encoder_attention: dict[int, int]  # id(encoder self-attention module) -> layer
    encoder_positions: torch.nn.Module | None  # BART's learned position embeddings (T5 has none)
    decoder_positions: torch.nn.Module | None
    decoder_start_token_id: int
    positions_after_prefix: bool = False
    """Learned absolute positions (BART): a row's tokens take P_row, P_row + 1, ... (True) or 0, 1, ...
    whatever its prefix (False)."""


def _position_hook(module, args, output):
    state = _PASS.get()
    positions = None if state is None else state.positions.get(id(module))
    if positions is None:
        return output
    return F.embedding(positions + module.offset, module.weight).to(output.dtype)


_INSTALLING = threading.Lock()


def seq2seq_hooks(model) -> _Seq2SeqHooks:
    """Install (once) the prefix attention and per-row positions on an encoder-decoder model."""
    hooks = getattr(model, "_steer_seq2seq", None)
    if hooks is not None:
        return hooks
    with _INSTALLING:  # the inference thread and a training job may meet a fresh model together
        hooks = getattr(model, "_steer_seq2seq", None)
        return hooks if hooks is not None else _install(model)


def _install(model) -> _Seq2SeqHooks:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from core.engine.model import encoder_decoder_layers

    encoder, decoder = model.get_encoder(), model.get_decoder()
    attention = [m for m in encoder.modules() if type(m).__name__ in _SUPPORTED_ATTENTION]
    n_encoder, n_decoder = encoder_decoder_layers(model.config)
    if len(attention) != n_encoder:
        names = sorted({type(m).__name__ for m in encoder.modules() if type(m).__name__.endswith("Attention")})
        raise ValueError(
            f"encoder-decoder prefixes support the T5 and BART families ({', '.join(_SUPPORTED_ATTENTION)}); "
            f"this model's encoder attention is {names or 'unknown'}"
        )
    AttentionInterface.register(_SEQ2SEQ_ATTENTION, _seq2seq_attention)
    AttentionMaskInterface.register(_SEQ2SEQ_ATTENTION, sdpa_mask)
    model.set_attn_implementation(_SEQ2SEQ_ATTENTION)
    positions = []
    for stack in (encoder, decoder):
        embed = getattr(stack, "embed_positions", None)
        if embed is not None and hasattr(embed, "offset"):
            embed.register_forward_hook(_position_hook)
            positions.append(embed)
        else:
            positions.append(None)
    start = model.config.decoder_start_token_id
    if start is None:
        start = model.config.pad_token_id
    hooks = _Seq2SeqHooks(
        encoder_layers=n_encoder,
        decoder_layers=n_decoder,
        encoder_attention={id(m): i for i, m in enumerate(attention)},
        encoder_positions=positions[0],
        decoder_positions=positions[1],
        decoder_start_token_id=int(start),
    )
    model._steer_seq2seq = hooks
    return hooks


def split_prefix(prefix: Prefix, encoder_layers: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A row's (composed) seq2seq prefix as (encoder part (L_enc, ...), decoder part (L_dec, ...))."""
    kv = compose(prefix)
    if kv is None:
        return None, None
    return kv[:encoder_layers], kv[encoder_layers:]


class Seq2SeqBatchCache:
    """A batch of an encoder-decoder model: each row's encoder output (its source read under its
    encoder prefix), the decoder's self-attention cache (a BatchCache holding the decoder prefix and
    every decoder token) and the cross-attention K/V the model computed from the encoder output.

    Rows join, leave and are trimmed as in BatchCache; the encoder side is right-padded per row and
    masked for it. `decode` runs the model on new decoder tokens, so the per-row positions and the
    prefix attention are in force exactly during that pass.
    """

    def __init__(
        self, model, hooks: _Seq2SeqHooks, decoder: BatchCache, states: torch.Tensor, source_mask: torch.Tensor
    ):
        self.model = model
        self.hooks = hooks
        self.decoder = decoder
        self.encoder_states = states  # (B, S, hidden)
        self.encoder_mask = source_mask  # (B, S)
        self._cross: list[_ReservedLayer] | None = None  # per decoder layer (B, H, S, D), after the first pass
        self.prefix_lengths = decoder.next_position.clone()  # (B,) each row's decoder prefix length

    # -- building: the encoder pass -----------------------------------------------------------------

    @classmethod
    def encode(
        cls,
        model,
        sources: Sequence[Sequence[int]],
        rows: Sequence[Prefix],
        geometry: PrefixGeometry,
        *,
        pad_token_id: int,
        reserve: bool = False,
        capture: list | None = None,
    ) -> Seq2SeqBatchCache:
        """Encode each row's source under its encoder prefix; hold its decoder prefix for decoding.

        `rows[i]`: None, one (L_enc + L_dec, 2, H, P, D) KV or several composed in order.
        Differentiable in the prefixes. With `capture` (a list), each encoder layer appends the
        (B, H, T, D) keys and values of the source tokens, in layer order.
        """
        hooks = seq2seq_hooks(model)
        n_enc, n_dec = hooks.encoder_layers, hooks.decoder_layers
        if geometry.num_layers != n_enc + n_dec:
            raise ValueError(f"geometry has {geometry.num_layers} layers, the model {n_enc} + {n_dec}")
        parts = [split_prefix(p, n_enc) for p in rows]
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        enc_geometry = PrefixGeometry(n_enc, geometry.num_kv_heads, geometry.head_dim)
        dec_geometry = PrefixGeometry(n_dec, geometry.num_kv_heads, geometry.head_dim)
        prefixes = BatchCache.from_prefixes([e for e, _ in parts], enc_geometry, device=device, dtype=dtype)
        width = max(len(s) for s in sources)
        ids = torch.full((len(sources), width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(sources), width), dtype=torch.long, device=device)
        for i, source in enumerate(sources):  # right padding: prefix and tokens stay contiguous (T5)
            ids[i, : len(source)] = torch.tensor(list(source), device=device)
            mask[i, : len(source)] = 1
        state = _Pass()
        if prefixes.width or capture is not None:
            state.encoder = _EncoderPrefix(
                keys=[layer.keys for layer in prefixes._layers],
                values=[layer.values for layer in prefixes._layers],
                key_mask=torch.cat([prefixes.mask, mask], dim=1).bool()[:, None, None, :],
                width=prefixes.width,
                layer_of=hooks.encoder_attention,
                capture=capture,
            )
        if hooks.encoder_positions is not None:
            first = prefixes.next_position if hooks.positions_after_prefix else torch.zeros_like(prefixes.next_position)
            state.positions[id(hooks.encoder_positions)] = first[:, None] + torch.arange(width, device=device)
        with _running(state):
            states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        decoder = BatchCache.from_prefixes(
            [d for _, d in parts], dec_geometry, device=device, dtype=dtype, reserve=reserve
        )
        return cls(model, hooks, decoder, states, mask)

    # -- running the decoder --------------------------------------------------------------------

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Feed decoder tokens `input_ids` (B, T) to every row; returns the model output (`.logits`).

        Padding, if any, must sit on the right and only in a row's last pass (training); generation
        feeds one token per row per pass.
        """
        from transformers import EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        inputs = self.decoder.model_inputs(input_ids, attention_mask)
        cross = _LayeredKV(self._cross) if self._cross is not None else DynamicCache()
        cache = EncoderDecoderCache(inputs["cache"], cross)
        state = _Pass()
        if self.hooks.decoder_positions is not None:
            positions = inputs["position_ids"]
            if not self.hooks.positions_after_prefix:
                positions = positions - self.prefix_lengths[:, None]
            state.positions[id(self.hooks.decoder_positions)] = positions
        with _running(state):
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states),
                attention_mask=self.encoder_mask,
                decoder_input_ids=input_ids,
                decoder_attention_mask=inputs["attention_mask"],
                cache=cache,
                use_cache=True,
                **kwargs,
            )
        if self._cross is None:
            self._cross = [_ReservedLayer(layer.keys, layer.values) for layer in cross.layers]
        return out

    def start(self, **kwargs):
        """The first decoder pass: every row's decoder start token. Returns the model output."""
        ids = torch.full((self.batch_size, 1), self.hooks.decoder_start_token_id, device=self.encoder_mask.device)
        return self.decode(ids, **kwargs)

    # -- rows joining, leaving ------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.decoder.batch_size

    @property
    def next_position(self) -> torch.Tensor:
        return self.decoder.next_position

    @property
    def mask(self) -> torch.Tensor:
        return self.decoder.mask

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then drop columns none of them uses."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.encoder_mask.device)
        self.decoder.keep_rows(rows)
        self.prefix_lengths = self.prefix_lengths.index_select(0, index)
        self.encoder_states = self.encoder_states.index_select(0, index)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        if self._cross is not None:
            for layer in self._cross:
                layer.hold(layer.keys.index_select(0, index), layer.values.index_select(0, index), 0)
        self._trim_source()

    def append_rows(self, other: Seq2SeqBatchCache) -> None:
        """Add `other`'s rows after this cache's (both past their first decoder pass)."""
        if self._cross is None or other._cross is None:
            raise ValueError("rows join a running batch only after their first decoder pass")
        self.decoder.append_rows(other.decoder)
        self.prefix_lengths = torch.cat([self.prefix_lengths, other.prefix_lengths])
        width = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])

        def right(t: torch.Tensor, dim: int) -> torch.Tensor:
            n = width - t.shape[dim]
            if not n:
                return t
            pad = [0, 0] * (t.dim() - dim - 1) + [0, n]
            return F.pad(t, pad)

        self.encoder_states = torch.cat([right(self.encoder_states, 1), right(other.encoder_states, 1)])
        self.encoder_mask = torch.cat([right(self.encoder_mask, 1), right(other.encoder_mask, 1)])
        for layer, new in zip(self._cross, other._cross):
            keys = torch.cat([right(layer.keys, 2), right(new.keys, 2)])
            values = torch.cat([right(layer.values, 2), right(new.values, 2)])
            layer.hold(keys, values, 0)

    def _trim_source(self) -> None:
        """Drop trailing source columns no row uses."""
        if self.batch_size == 0:
            return
        used = int(self.encoder_mask.sum(dim=1).max())
        if used < self.encoder_mask.shape[1]:
            self.encoder_states = self.encoder_states[:, :used]
            self.encoder_mask = self.encoder_mask[:, :used]
            if self._cross is not None:
                for layer in self._cross:
                    layer.hold(layer.keys[:, :, :used], layer.values[:, :, :used], 0)

    def decoder_kv(self, row: int) -> torch.Tensor:
        """Row `row`'s decoder self-attention columns as a decoder prefix part (L_dec, 2, H, n, D)."""
        return self.decoder.row_kv(row)
