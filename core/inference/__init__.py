"""Serving personalised completions: prefix cache, the batching engine, and how requests reach it.

CompletionRequest ──> CompletionService ──> Completer ──(in-process | Redis Streams)──> InferenceEngine
(requests.py)         (service.py: catalog,                                                 │
                       corrupt-prefix fallback)                  PrefixCache ──> MixedBatchGenerator
"""
