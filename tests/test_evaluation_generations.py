"""What users read: generated texts judged by an independent style classifier, and degeneration."""

from __future__ import annotations

import json
import random

import pytest

from core.engine.model import load_base_model
from core.engine.prefix import kv_from_text
from core.engine.prompts import text_ids
from core.evaluation.generations import (
    CHAT_PROMPTS,
    PLAIN_OPENINGS,
    GenerationSettings,
    StyleJudge,
    degeneration,
    generate_texts,
    repeated_ngram_share,
)
from core.evaluation.runner import run_evaluation
from tests.support.evaluation import WORDS, tiny_spec
from tests.support.models import model_cache_dir


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny", cache_root=model_cache_dir())


def _styled(author: str, n: int, seed: int) -> list[str]:
    """Texts with an author's habits (vocabulary, punctuation, casing), on shuffled words."""
    rng = random.Random(seed)
    habits = {
        "terse": (["ok", "done", "sent", "fine", "noted"], ". "),
        "ornate": (["wherefore", "thine", "splendour", "whilst", "heretofore"], "; "),
        "shouty": (["URGENT", "NOW", "ASAP", "NEED", "TODAY"], "!! "),
    }
    words, joint = habits[author]
    return [joint.join(rng.choice(words) + " " + rng.choice(words) for _ in range(4)) for _ in range(n)]


def test_the_judge_names_authors_by_their_habits_and_empty_texts_are_nobodys():
    judge = StyleJudge({a: _styled(a, 30, 0) for a in ("terse", "ornate", "shouty")})
    held_out = {a: _styled(a, 10, 1) for a in ("terse", "ornate", "shouty")}
    result = judge.attribution(held_out)
    assert result["overall"] == 1.0 and result["texts"] == 30
    swapped = judge.attribution({"terse": held_out["ornate"], "ornate": held_out["shouty"], "shouty": ["", " "]})
    assert swapped["overall"] == 0.0 and swapped["per_user"]["shouty"] is None and swapped["texts"] == 20


def test_degeneration_counts_repeats_loops_and_empty_texts():
    assert repeated_ngram_share("one two three four five", 3) == 0.0
    assert repeated_ngram_share("#1 #2 #3 #1 #2 #3 #1 #2 #3", 3) > 0.5
    stats = degeneration({"a": ["a fresh sentence with no repeats at all", ""], "b": ["go go go go go go go go"]})
    assert stats["texts"] == 3 and stats["empty"] == pytest.approx(1 / 3) and stats["looping"] == pytest.approx(1 / 3)
    assert 0 < stats["repeated_3gram"] < 1


def test_every_user_writes_for_every_prompt_in_one_mixed_batch_reproducibly(tiny):
    tok = tiny.tokenizer
    adaptations = {
        "ada": kv_from_text(tiny, text_ids(tok, "Numbers and patterns, with notes")),
        "bo": None,  # the base model, under its own seeds
        "cy": None,
    }
    settings = GenerationSettings(per_prompt=2, max_tokens=8)
    texts = generate_texts(tiny, adaptations, settings, batch_size=7)
    per_user = 2 * (len(CHAT_PROMPTS) + len(PLAIN_OPENINGS))
    assert {u: len(t) for u, t in texts.items()} == dict.fromkeys(adaptations, per_user)
    assert texts == generate_texts(tiny, adaptations, settings, batch_size=64)  # batching changes nothing
    assert texts["bo"] != texts["cy"]  # two users' seeds differ, even on the same model


def test_an_evaluation_with_generations_reports_the_judge_and_every_engine_method(tmp_path, tiny):
    spec = tiny_spec(
        tmp_path, methods=("v0", "prefix", "prompt"), generations=1, generation_tokens=6, frequency_penalty=2.0
    )
    results = run_evaluation(spec, progress=False, base=tiny)
    assert 0 <= results["judge"]["ceiling"]["overall"] <= 1
    judged = [results["base"]] + [results["methods"][m] for m in ("v0", "prefix")]
    for generations in [j[key] for j in judged for key in ("generations", "generations_penalized")]:
        assert set(generations["attribution"]["per_user"]) == set(WORDS)
        assert 0 <= generations["attribution"]["overall"] <= 1
        assert generations["degeneration"]["texts"] == len(WORDS) * (len(CHAT_PROMPTS) + len(PLAIN_OPENINGS))
    assert "generations" not in results["methods"]["prompt"]  # a baseline outside the engine writes nothing here
    # the service's defaults, and the same with the penalties (what they change: test_engine_sampling.py)
    prefix = results["methods"]["prefix"]
    assert (prefix["generations"]["settings"]["frequency_penalty"], prefix["generations"]["settings"]["seed"]) == (0, 0)
    assert prefix["generations_penalized"]["settings"]["frequency_penalty"] == 2.0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["spec"]["frequency_penalty"] == 2.0
    assert "## Generated texts" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "results.partial.json").exists()
