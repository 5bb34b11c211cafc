"""Writing samples → training examples."""

import pytest

from core.engine.data import (
    CHAT_INSTRUCTIONS,
    FORMAT_CHAT,
    FORMAT_PLAIN,
    IGNORE,
    REQUESTS_DERIVED,
    build_examples,
    clean_text,
    derive_request,
    prepare_samples,
    split_samples,
    topic_words,
)
from tests.engine_fixtures import tiny  # noqa: F401


def test_cleaning_removes_control_characters_and_tidies_whitespace():
    assert clean_text("  Hello\x00 world \r\n\r\n\r\n\r\nBye\t \n") == "Hello world\n\nBye"


def test_near_identical_samples_are_deduplicated_in_order():
    assert prepare_samples(["A  b", "c", "A b ", "", "  ", "c"]) == ["A  b", "c"]


def test_split_is_seeded_and_disjoint():
    samples = [f"s{i}" for i in range(20)]
    train, val = split_samples(samples, 0.15, seed=1)
    assert split_samples(samples, 0.15, seed=1) == (train, val)
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == sorted(samples)
    assert split_samples(samples[:3], 0.15, seed=1) == (samples[:3], [])


def test_chat_examples_score_only_the_users_text(tiny):
    tok = tiny.tokenizer
    [plain] = build_examples(tok, ["My own words."], 128, (FORMAT_PLAIN,))
    [chat] = build_examples(tok, ["My own words."], 128, (FORMAT_CHAT,))
    assert plain.labels == plain.input_ids and plain.input_ids[-1] == tok.eos_token_id
    scored = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE]
    assert tok.decode(scored, skip_special_tokens=True) == "My own words."
    assert "<|im_start|>assistant" in tok.decode(chat.input_ids)


def test_long_samples_are_chunked_to_the_window(tiny):
    text = " ".join(f"word{i}" for i in range(300))
    examples = build_examples(tiny.tokenizer, [text], 64)
    assert len(examples) > 4 and all(len(e.input_ids) <= 64 for e in examples)


def test_a_derived_request_names_the_samples_own_topic_and_is_stable():
    text = "The tariff question again: the tariff on wool hurts farmers, and the treasury needs revenue."
    request = derive_request(text)
    assert request == derive_request(text)
    assert {"tariff"} <= set(topic_words(text)) and "tariff" in request
    assert not ({"the", "and", "again"} & set(topic_words(text)))
    assert derive_request("!!! ...") in CHAT_INSTRUCTIONS  # nothing topical: a generic request


def test_derived_chat_rows_ask_each_sample_its_own_request(tiny):
    samples = ["Gardens and roses: the roses bloom early in warm gardens.", "Revenue grew; revenue is what counts."]
    generic = build_examples(tiny.tokenizer, samples, 128, (FORMAT_CHAT,))
    derived = build_examples(tiny.tokenizer, samples, 128, (FORMAT_CHAT,), chat_requests=REQUESTS_DERIVED)
    for example, sample in zip(derived, samples):
        prompt = tiny.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE])
        assert derive_request(sample) in prompt
    # the answers (scored tokens) are the same text either way: only the request changed
    scored = [[t for t, label in zip(e.input_ids, e.labels) if label != IGNORE] for e in (*generic, *derived)]
    assert scored[:2] == scored[2:]
    with pytest.raises(ValueError, match="chat requests"):
        build_examples(tiny.tokenizer, samples, 128, (FORMAT_CHAT,), chat_requests="clever")
