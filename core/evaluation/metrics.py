"""Metrics over any scorer: held-out perplexity, attribution, knowledge preservation.

A *scorer* maps a mixed batch of examples, each tagged with the user whose adaptation it should see
(None = the bare base model), to per-row summed token loss and scored-token count. Prefixes, prompt
tuning and LoRA all provide one, so every method is measured by the same code on the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from core.engine import lora
from core.engine.adaptation import Adaptation
from core.engine.data import Example
from core.engine.lora import LoRABatch
from core.engine.model import BaseModel
from core.tuners.loop import token_losses

ATTRIBUTION_GROUP = 3
"""Held-out samples per decision of the grouped attribution figure."""


class Scorer(Protocol):
    def loss_sums(self, rows: list[Example], users: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) summed next-token loss, (B,) scored tokens); no gradient needed."""
        ...


class PrefixScorer:
    """Each row sees its user's prefix KV (L, 2, H, P, D), through the engine's own mixed-batch forward.
    A value of `kvs` may also be a tuple of KVs composed in that order (a user's prefix, then control
    prefixes: core/evaluation/controls.py), exactly as a composed request is served, or an
    Adaptation (core/tuners/registry.py: a prefix and/or a LoRA), each row under its own user's LoRA."""

    def __init__(self, base: BaseModel, kvs: dict[str, torch.Tensor | tuple | Adaptation]):
        self.base, self.kvs = base, kvs

    @torch.no_grad()
    def loss_sums(self, rows, users):
        values = [None if u is None else self.kvs[u] for u in users]
        prefixes = [v.kv if isinstance(v, Adaptation) else v for v in values]
        loras = [v.lora if isinstance(v, Adaptation) else None for v in values]
        batch = LoRABatch.from_rows(loras, device=self.base.device, dtype=self.base.dtype)
        with lora.active(self.base.model, batch):
            losses, scored = token_losses(self.base, rows, prefixes)
        return losses.sum(dim=1).cpu(), scored.sum(dim=1).float().cpu()


@torch.no_grad()
def score_rows(
    scorer: Scorer,
    rows: list[Example],
    users: list[str | None],
    chunk: int = 16,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score many rows in length-sorted chunks (little padding); results in the original order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    sums = torch.zeros(len(rows), dtype=torch.float64)
    counts = torch.zeros(len(rows), dtype=torch.float64)
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        s, c = scorer.loss_sums([rows[i] for i in part], [users[i] for i in part])
        sums[part], counts[part] = s.double(), c.double()
        if on_chunk is not None:
            on_chunk(len(part))
    return sums, counts


@dataclass
class UserEvalSet:
    """One user's held-out rows: per test sample its plain examples, and all its chat examples."""

    user: str
    plain: list[list[Example]]  # one list of chunks per test sample
    chat: list[Example]
    """The held-out text as answers to the four generic requests (what today's rows train on)."""
    task_chat: list[Example] = field(default_factory=list)
    """The held-out text as the answer to a request it answers (derived from it: core/engine/data.py)."""


def ppl(loss_sum: float, count: float) -> float:
    return math.exp(loss_sum / count) if count else float("nan")


def rows_needed(sets: list[UserEvalSet], general: list[Example], users: list[str]) -> int:
    """Rows one method's evaluation scores (for a progress bar): attribution + chat + general."""
    plain = sum(len(c) for s in sets for c in s.plain)
    chat = sum(len(s.chat) + len(s.task_chat) for s in sets)
    return plain * len(users) + chat + len(general) * len(users)


def evaluate_base(scorer: Scorer, sets: list[UserEvalSet], general: list[Example], **kw) -> dict:
    """Base-model perplexity per user (plain, chat) and on the general text."""
    per_user = {}
    for s in sets:
        plain = [ex for chunks in s.plain for ex in chunks]
        ps, pc = score_rows(scorer, plain, [None] * len(plain), **kw)
        cs, cc = score_rows(scorer, s.chat, [None] * len(s.chat), **kw)
        per_user[s.user] = {"ppl_plain": ppl(ps.sum(), pc.sum()), "ppl_chat": ppl(cs.sum(), cc.sum())}
        if s.task_chat:
            ts, tc = score_rows(scorer, s.task_chat, [None] * len(s.task_chat), **kw)
            per_user[s.user]["ppl_task"] = ppl(ts.sum(), tc.sum())
    gs, gc = score_rows(scorer, general, [None] * len(general), **kw)
    return {"per_user": per_user, "ppl_general": ppl(gs.sum(), gc.sum())}


def evaluate_method(scorer: Scorer, sets: list[UserEvalSet], general: list[Example], base: dict, **kw) -> dict:
    """Every metric of one trained method, per user and overall, relative to the base-model numbers.

    Attribution: each held-out sample (all its plain chunks) is scored under every user's adaptation;
    the prediction is the user with the lowest mean token loss. The diagonal of those scores is also
    the user's own held-out plain perplexity, so it is computed once.
    """
    users = [s.user for s in sets]
    samples = [(i, chunks) for i, s in enumerate(sets) for chunks in s.plain]
    rows, tags, owner = [], [], []
    for k, (_, chunks) in enumerate(samples):
        for u in users:
            rows.extend(chunks)
            tags.extend([u] * len(chunks))
            owner.extend([k] * len(chunks))
    sums, counts = score_rows(scorer, rows, tags, **kw)
    n, U = len(samples), len(users)
    loss_sum = torch.zeros(n, U, dtype=torch.float64)
    loss_cnt = torch.zeros(n, U, dtype=torch.float64)
    column = {u: j for j, u in enumerate(users)}
    for r in range(len(rows)):
        loss_sum[owner[r], column[tags[r]]] += sums[r]
        loss_cnt[owner[r], column[tags[r]]] += counts[r]
    mean_loss = loss_sum / loss_cnt.clamp(min=1)  # (n_samples, n_users)
    truth = torch.tensor([i for i, _ in samples])
    predicted = mean_loss.argmin(dim=1)
    # Calibrated: each adaptation's loss minus its mean over all held-out samples (no labels used).
    # An adaptation that lowers the loss of every text of the era then stops winning every sample;
    # what is left is how much more it fits this text than it fits texts in general.
    predicted_calibrated = (mean_loss - mean_loss.mean(dim=0, keepdim=True)).argmin(dim=1)
    confusion = _confusion(truth, predicted, U)
    confusion_calibrated = _confusion(truth, predicted_calibrated, U)
    grouped = _grouped_attribution(loss_sum, loss_cnt, truth, U, ATTRIBUTION_GROUP)

    per_user = {}
    for i, s in enumerate(sets):
        mine = truth == i
        own_plain = ppl(loss_sum[mine, i].sum(), loss_cnt[mine, i].sum())
        cs, cc = score_rows(scorer, s.chat, [s.user] * len(s.chat), **kw)
        gs, gc = score_rows(scorer, general, [s.user] * len(general), **kw)
        b = base["per_user"][s.user]
        own_chat, own_general = ppl(cs.sum(), cc.sum()), ppl(gs.sum(), gc.sum())
        # Own vs others: this user's adaptation against the geometric mean of the other users'
        # adaptations, on this user's held-out text (< 1: the adaptation fits what is theirs).
        mean_by_adaptation = loss_sum[mine].sum(dim=0) / loss_cnt[mine].sum(dim=0).clamp(min=1)  # (U,)
        others = torch.cat([mean_by_adaptation[:i], mean_by_adaptation[i + 1 :]])
        own_vs_others = math.exp(float(mean_by_adaptation[i] - others.mean())) if len(others) else float("nan")
        per_user[s.user] = {
            "ppl_plain": own_plain,
            "ppl_chat": own_chat,
            "ppl_general": own_general,
            "ratio_plain": own_plain / b["ppl_plain"],
            "ratio_chat": own_chat / b["ppl_chat"],
            "ratio_general": own_general / base["ppl_general"],
            "own_vs_others": own_vs_others,
            "attribution_accuracy": _accuracy(predicted[mine], i),
            "attribution_accuracy_calibrated": _accuracy(predicted_calibrated[mine], i),
            "test_samples": int(mine.sum()),
        }
        if s.task_chat:
            ts, tc = score_rows(scorer, s.task_chat, [s.user] * len(s.task_chat), **kw)
            per_user[s.user]["ppl_task"] = ppl(ts.sum(), tc.sum())
            per_user[s.user]["ratio_task"] = per_user[s.user]["ppl_task"] / b["ppl_task"]
    overall = {
        key: sum(p[key] for p in per_user.values()) / len(per_user)
        for key in (
            *("ratio_plain", "ratio_chat", "ratio_general"),
            *("ppl_plain", "ppl_chat", "ppl_general", "own_vs_others"),
        )
    }
    for key in ("ppl_task", "ratio_task"):
        if all(key in p for p in per_user.values()):
            overall[key] = sum(p[key] for p in per_user.values()) / len(per_user)
    overall["attribution_accuracy"] = float((predicted == truth).double().mean())
    overall["attribution_accuracy_calibrated"] = float((predicted_calibrated == truth).double().mean())
    overall["attribution_accuracy_grouped"] = grouped
    overall["attribution_group_size"] = ATTRIBUTION_GROUP
    return {
        "per_user": per_user,
        "overall": overall,
        "confusion": _confusion_table(users, confusion),
        "confusion_calibrated": _confusion_table(users, confusion_calibrated),
    }


def _grouped_attribution(
    loss_sum: torch.Tensor, loss_cnt: torch.Tensor, truth: torch.Tensor, n_users: int, group: int
) -> float | None:
    """Attribution of `group` held-out samples of one user at a time (their losses pooled, in
    order; a user's remainder is dropped): closer to how an application tells authors apart, from
    several texts rather than one paragraph. None when no user has `group` samples."""
    hits, decisions = 0, 0
    for i in range(n_users):
        rows = (truth == i).nonzero().flatten()
        for start in range(0, len(rows) - group + 1, group):
            block = rows[start : start + group]
            pooled = loss_sum[block].sum(dim=0) / loss_cnt[block].sum(dim=0).clamp(min=1)
            hits += int(pooled.argmin()) == i
            decisions += 1
    return hits / decisions if decisions else None


def _confusion(truth: torch.Tensor, predicted: torch.Tensor, n_users: int) -> torch.Tensor:
    confusion = torch.zeros(n_users, n_users, dtype=torch.long)
    for t, p in zip(truth.tolist(), predicted.tolist()):
        confusion[t, p] += 1
    return confusion


def _confusion_table(users: list[str], confusion: torch.Tensor) -> dict:
    row_totals = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    return {"users": users, "counts": confusion.tolist(), "normalized": (confusion.double() / row_totals).tolist()}


def _accuracy(predicted: torch.Tensor, user_index: int) -> float:
    return float((predicted == user_index).double().mean()) if len(predicted) else float("nan")
