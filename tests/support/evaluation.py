"""A tiny authored dataset and evaluation spec that the evaluation tests share."""

from __future__ import annotations

import json
from pathlib import Path

from core.evaluation.runner import EvalSpec

WORDS = {
    "ada": "the engine computes numbers and patterns with careful notes on every operation",
    "bo": "rivers and mountains stretch far beyond the quiet village under evening skies",
    "cy": "markets opened early today as traders watched prices rise and fall again",
}
"""Three users, each writing variations of one sentence."""


def write_dataset(path: Path, n: int = 10) -> Path:
    rows = [{"user": u, "text": f"{text} sample {i}."} for u, text in WORDS.items() for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_spec(tmp_path: Path, **overrides) -> EvalSpec:
    """Two steps of every method on the tiny model over WORDS (and WORDS as the general text). The
    voice-and-task answers (most of a tiny run's time) are off: the report test and
    tests/test_evaluation_tasks.py measure them."""
    values = {
        "tasks": False,
        "data": str(write_dataset(tmp_path / "d.jsonl")),
        "general": str(write_dataset(tmp_path / "g.jsonl")),
        "max_steps": 2,
        "eval_every": 1,
        "batch_size": 2,
        "max_seq_len": 64,
        "prefix_len": 4,
        "base_model": "tiny",
        "out": str(tmp_path / "out"),
    }
    return EvalSpec(**{**values, **overrides})
