"""Knowledge preservation: keep a user's prefix from changing what the model does on other text.

A prefix trained only on one user's text learns "this is X writing", and with it drags the model's
predictions on unrelated text toward X (measured on SmolLM2: general-text perplexity 1.3x the base
model's with a prefix attached, where LoRA gave 1.07x). The remedy here is a KL term on *anchor*
text: a few sequences the base model samples itself, unconditioned, once per job. On anchors the
prefixed model is pulled toward the base model's own next-token distribution, KL(base || prefixed),
so a prefix may change what the user's text needs and pays for whatever else it changes.

Data-free on purpose: no corpus to ship, and nothing of any other user is involved. The anchors
depend only on the base model and the job's seed, so a user trained alone and the same user
trained beside others see the same anchors (the multi-user equivalence still holds).

Because they depend on no user, they are sampled once per base model, not once per job
(`base_anchors`): sampling them was most of a job's start-up (65 s of 112 s before step 1 on
SmolLM2, issue 28). A process keeps them beside its model; with `keep_anchor_tokens_in(directory)`
(the service's model cache) their tokens also outlive the process, and a new process only scores
them again (one forward pass; scoring is deterministic where sampling need not be across machines).

Unconditioned anchors keep the model's *text* where it was; they say nothing about requests. With
`ANCHOR_PROMPTS_REQUESTS` each anchor is instead a chat request of `ANCHOR_REQUESTS` and the base
model's own sampled answer to it: the prefix is pulled to answer requests as the base model does,
so it can change how an answer is said more cheaply than whether the request is answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F

from core.engine.data import IGNORE, Example
from core.engine.model import BaseModel
from core.engine.prompts import chat_prompt_ids

log = logging.getLogger(__name__)

ANCHOR_PROMPTS_NONE = "none"
ANCHOR_PROMPTS_REQUESTS = "requests"
ANCHOR_PROMPTS = (ANCHOR_PROMPTS_NONE, ANCHOR_PROMPTS_REQUESTS)
ANCHOR_REQUESTS = (
    "Reply to a friend who asked if you can come to dinner on Saturday.",
    "Write a short note asking a neighbour to water your plants next week.",
    "Explain in a few sentences how to boil an egg.",
    "Announce to your team that the office will close early on Friday.",
    "Thank a teacher for their help this year.",
    "Describe the view from a window in winter.",
    "Give three tips for a first job interview.",
    "Write a message cancelling a meeting and proposing a new time.",
    "Summarise why people enjoy reading novels.",
    "Ask a shop whether an order has been sent yet.",
    "Write a birthday message for a cousin.",
    "Explain what a budget is to a child.",
)
"""Everyday requests whose base-model answers anchor instruction following. Kept apart from the
evaluation's request bank (core/evaluation/tasks.py), which no training ever sees."""


@dataclass
class Anchors:
    """Base-model samples and the base model's log-probabilities at each of their positions."""

    examples: list[Example]
    log_probs: list[torch.Tensor]
    """Per anchor, (len - 1, vocab) float32: the base model's prediction of each next token."""
    first: list[int] | None = None
    """Per anchor, the first position whose prediction the KL counts (None: all of them; a request
    anchor counts only the positions that predict its answer)."""

    def first_position(self, k: int) -> int:
        return 0 if self.first is None else self.first[k]

    def __len__(self) -> int:
        return len(self.examples)


_remembered: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Anchors]] = weakref.WeakKeyDictionary()
_remembered_lock = threading.Lock()
_token_directory: Path | None = None
MAX_REMEMBERED_PER_BASE = 2
"""Anchor sets a process keeps per base model (a default set is 8 x 48 positions x the vocabulary
in float32: 75 MB on SmolLM2)."""


def keep_anchor_tokens_in(directory: Path | None) -> None:
    """Keep sampled anchors' tokens under `directory` (None: in memory only), so that a new process
    scores them instead of sampling them again. The service calls this with its model cache."""
    global _token_directory
    _token_directory = None if directory is None else Path(directory)


def base_anchors(base: BaseModel, count: int, length: int, seed: int, prompts: str = ANCHOR_PROMPTS_NONE) -> Anchors:
    """`sample_anchors(base, count, length, seed, prompts)`, sampled once per base model and
    precision and then reused: the same tokens and log-probabilities for every job."""
    key = _anchor_key(base, count, length, seed, prompts)
    with _remembered_lock:
        known = _remembered.setdefault(base.model, {})
        if key in known:
            return known[key]
    anchors = _read_tokens(base, key)
    if anchors is None:
        anchors = sample_anchors(base, count, length, seed, prompts)
        _write_tokens(key, anchors)
    with _remembered_lock:
        known = _remembered.setdefault(base.model, {})
        while len(known) >= MAX_REMEMBERED_PER_BASE:
            known.pop(next(iter(known)))
        return known.setdefault(key, anchors)


def _anchor_key(base: BaseModel, count: int, length: int, seed: int, prompts: str) -> tuple:
    """What the sampled tokens depend on: the weights, the precision they are computed in, the
    sampler's version, the draw, and (for request anchors) the requests themselves."""
    autocast = torch.is_autocast_enabled(base.device.type)
    computed_in = str(torch.get_autocast_dtype(base.device.type) if autocast else base.dtype)
    requests = ANCHOR_REQUESTS if prompts == ANCHOR_PROMPTS_REQUESTS else ()
    versions = (torch.__version__, transformers.__version__)
    return (base.fingerprint, computed_in, base.device.type, count, length, seed, prompts, requests, versions)


def _token_file(key: tuple) -> Path | None:
    if _token_directory is None:
        return None
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return _token_directory / f"anchors-{digest}.json"


def _read_tokens(base: BaseModel, key: tuple) -> Anchors | None:
    path = _token_file(key)
    if path is None or not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        if stored["key"] != json.loads(json.dumps(key)):
            return None
        return _scored(base, stored["rows"], stored["first"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable anchor file; sampling the anchors again")
        return None


def _write_tokens(key: tuple, anchors: Anchors) -> None:
    path = _token_file(key)
    if path is None:
        return
    record = {"key": key, "rows": [ex.input_ids for ex in anchors.examples], "first": anchors.first}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
            json.dump(record, out)
        os.replace(out.name, path)  # whole or absent: another process may read it at any moment
    except OSError as exc:
        log.warning("could not keep the anchors' tokens (%s); the next process samples them again", exc)


@torch.no_grad()
def _scored(base: BaseModel, rows: list[list[int]], first: list[int] | None) -> Anchors:
    """Anchors from their tokens: the base model's log-probabilities at each position (unconditioned
    ones, all of one length, in one forward; request anchors one by one). Fresh samples and tokens
    read back from disk are scored by this same code."""
    if first is None:
        ids = torch.tensor(rows, device=base.device)
        log_probs = F.log_softmax(base.model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        return Anchors([Example(list(row), list(row)) for row in rows], list(log_probs))
    examples, log_probs = [], []
    for k, row in enumerate(rows):
        ids = torch.tensor([row], device=base.device)
        log_probs.append(F.log_softmax(base.model(input_ids=ids).logits[0, :-1].float(), dim=-1))
        examples.append(Example(list(row), [IGNORE] * (first[k] + 1) + row[first[k] + 1 :]))
    return Anchors(examples, log_probs, first)


@torch.no_grad()
def sample_anchors(base: BaseModel, count: int, length: int, seed: int, prompts: str = ANCHOR_PROMPTS_NONE) -> Anchors:
    """`count` sequences of `length` tokens sampled from the bare base model (seeded): from nothing,
    or (`prompts="requests"`) as answers to the first `count` of `ANCHOR_REQUESTS`."""
    if prompts == ANCHOR_PROMPTS_REQUESTS:
        return _request_anchors(base, count, length, seed)
    if prompts != ANCHOR_PROMPTS_NONE:
        raise ValueError(f"anchor prompts must be one of {ANCHOR_PROMPTS}, not {prompts!r}")
    tokenizer = base.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt = torch.full((count, 1), start, dtype=torch.long, device=base.device)
    with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
        torch.manual_seed(seed)
        sampled = _sampled(base, prompt, length)
    # Every anchor has exactly 1 + `length` tokens (min_new_tokens): one unpadded forward scores all.
    return _scored(base, sampled.tolist(), None)


def _sampled(base: BaseModel, prompt: torch.Tensor, length: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`prompt` (B, T), left-padded where `mask` says, and exactly `length` tokens the base model
    samples after it (top-p 0.95)."""
    return base.model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt) if mask is None else mask,
        do_sample=True,
        top_p=0.95,
        temperature=1.0,
        max_new_tokens=length,
        min_new_tokens=length,
        pad_token_id=base.tokenizer.pad_token_id,
    )


def _request_anchors(base: BaseModel, count: int, length: int, seed: int) -> Anchors:
    """Each anchor: a request (chat-formatted) and the base model's sampled answer of `length`
    tokens; the KL is taken over the answer's positions only (the request is the same either way).
    All requests in one left-padded `generate` call: one call per request cost 8x the decoding
    steps (on 2 contended cores, 60-120 s for the tiny test model's first job)."""
    tokenizer = base.tokenizer
    prompts = [
        chat_prompt_ids(tokenizer, [{"role": "user", "content": ANCHOR_REQUESTS[k % len(ANCHOR_REQUESTS)]}])
        for k in range(count)
    ]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=base.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=base.device)
    with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
        torch.manual_seed(seed)
        sampled = _sampled(base, ids, length, mask)
    rows = [row[width - len(p) :] for p, row in zip(prompts, sampled.tolist())]
    first = [len(p) - 1 for p in prompts]  # the position that predicts the answer's first token
    return _scored(base, rows, first)


def kl_from_base(hidden: torch.Tensor, base: BaseModel, base_log_probs: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Token-mean KL(base || prefixed) over one anchor row: `hidden` (T, H) is the prefixed model's
    last hidden state at the anchor's positions (the last one is not scored), counted from `first`."""
    logits = base.model.get_output_embeddings()(hidden[first:-1]).float()
    log_probs = F.log_softmax(logits, dim=-1)
    # kl_div(input=log q, target=log p) sums p * (log p - log q): KL(base || prefixed) per position.
    return F.kl_div(log_probs, base_log_probs[first:], log_target=True, reduction="none").sum(-1).mean()
