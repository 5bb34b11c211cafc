"""The batch's key/value cache: the only code that knows transformers' cache classes.

- `decoder.py`: `BatchCache`, every row's K/V (composed prefixes + tokens), masks and positions for a
  decoder-only model; also the decoder half of an encoder-decoder batch.
- `seq2seq.py`: `Seq2SeqBatchCache`, an encoder-decoder batch (T5, BART): encoder prefixes through a
  registered attention function, per-row positions, cross-attention K/V kept per row.
"""

from core.engine.batch_cache.decoder import BatchCache, Prefix, compose, prefix_length
from core.engine.batch_cache.seq2seq import Seq2SeqBatchCache, seq2seq_hooks, split_prefix

__all__ = ["BatchCache", "Prefix", "Seq2SeqBatchCache", "compose", "prefix_length", "seq2seq_hooks", "split_prefix"]
