"""Serving personalised completions: prefix cache, the batching engine, and how requests reach it.

    api/routes/completions.py ──> Completer ──(in-process | Redis Streams)──> InferenceEngine
                                                                                │
                                                          PrefixCache ──> MixedBatchGenerator
"""
