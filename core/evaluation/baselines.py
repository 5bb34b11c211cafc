"""Baselines trained through the same data, step budget, schedule and checkpoint selection as prefixes.

- Prompt tuning (Lester et al. 2021): P trainable input embeddings per user placed before the tokens;
  the frozen model is unchanged. Mixed-user batches work as for prefixes.
- LoRA (Hu et al. 2021) via PEFT, an optional extra: one adapter per user on a private copy of the base
  model (PEFT would otherwise patch the shared model in place). PEFT trains one adapter at a time, so
  each step runs one forward/backward per user.
Full fine-tuning is not offered: a 135M-parameter copy plus AdamW state per user (~2 GB) and a full
backward per user-step does not fit this harness's CPU budget.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F

from core.data import IGNORE, Example, build_examples, prepare_samples, split_samples
from core.model import BaseModel
from core.prompts import text_ids
from core.training import TrainingConfig, UserData, _warmup_then_linear

LORA_TARGETS = ("q_proj", "v_proj")


def lora_rank_for(base: BaseModel, target_params: int, targets=LORA_TARGETS) -> tuple[int, int]:
    """(rank, trainable params) of the LoRA whose parameter count is closest to `target_params`."""
    per_rank = 0
    for name, module in base.model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            per_rank += module.in_features + module.out_features
    rank = max(1, round(target_params / per_rank))
    return rank, rank * per_rank


def _row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V) for labels (B, T): per-row summed next-token loss and scored count."""
    targets = labels[:, 1:]
    scored = targets != IGNORE
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (losses * scored).sum(dim=1), scored.sum(dim=1).float()


def _padded(base: BaseModel, rows: list[Example]):
    """Right-padded (B, T) ids, labels and mask."""
    T = max(len(ex.input_ids) for ex in rows)
    ids = torch.full((len(rows), T), base.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, ex in enumerate(rows):
        n = len(ex.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
    return ids.to(base.device), labels.to(base.device), mask.to(base.device)


class PromptTuning:
    """Per-user soft prompts (P, hidden) over `inputs_embeds`; rows tagged None see no prompt."""

    name = "prompt"
    mixes_users = True

    def __init__(self, base: BaseModel, prompt_len: int):
        self.base, self.prompt_len = base, prompt_len
        self.prompts: dict[str, nn.Parameter] = {}

    def add_user(self, user: str, samples: list[str]) -> None:
        # Start from the embeddings of the user's own first tokens (Lester et al.'s vocab init).
        ids: list[int] = []
        for text in samples:
            ids.extend(text_ids(self.base.tokenizer, text + "\n"))
            if len(ids) >= self.prompt_len:
                break
        ids = (ids * self.prompt_len)[: self.prompt_len] or [self.base.tokenizer.eos_token_id] * self.prompt_len
        table = self.base.model.get_input_embeddings().weight
        self.prompts[user] = nn.Parameter(table[torch.tensor(ids, device=table.device)].detach().float().clone())

    def params(self, user: str) -> list[nn.Parameter]:
        return [self.prompts[user]]

    def loss_sums(self, rows, users):
        ids, labels, mask = _padded(self.base, rows)
        P = self.prompt_len
        embeds = self.base.model.get_input_embeddings()(ids)  # (B, T, hidden)
        zero = torch.zeros(P, embeds.shape[-1], device=embeds.device)
        prompts = torch.stack([zero if u is None else self.prompts[u] for u in users]).to(embeds.dtype)  # (B, P, hidden)
        prompt_mask = torch.tensor([[0 if u is None else 1] * P for u in users], device=mask.device)
        full_mask = torch.cat([prompt_mask, mask], dim=1)
        positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)  # unprompted rows start at position 0
        out = self.base.model(
            inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=full_mask, position_ids=positions
        )
        return _row_loss_sums(out.logits[:, P:], labels)

    def state(self, user: str) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompts[user].detach().clone().cpu()}

    def load_state(self, user: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prompts[user].copy_(state["prompt"])

    def served_params(self, user: str) -> int:
        return self.prompts[user].numel()


class LoRA:
    """One PEFT LoRA adapter per user on a private copy of the base model."""

    name = "lora"
    mixes_users = False

    def __init__(self, base: BaseModel, rank: int, targets=LORA_TARGETS, alpha: float | None = None):
        from peft import LoraConfig, get_peft_model  # optional extra: pip install 'steer[eval]'

        self.base, self.rank = base, rank
        self.config = LoraConfig(
            r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0, bias="none"
        )
        self._get_peft_model = get_peft_model
        self.model = None
        self.users: list[str] = []

    def add_user(self, user: str, samples: list[str]) -> None:
        if self.model is None:
            self.model = self._get_peft_model(copy.deepcopy(self.base.model), self.config, adapter_name=user)
        else:
            self.model.add_adapter(user, self.config)
        self.users.append(user)

    def _named(self, user: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if f".{user}." in n and "lora_" in n}

    def params(self, user: str) -> list[nn.Parameter]:
        return list(self._named(user).values())

    def loss_sums(self, rows, users):
        (user,) = set(users)  # PEFT trains one adapter per forward; the caller groups rows by user
        ids, labels, mask = _padded(self.base, rows)
        if user is None:
            with self.model.disable_adapter():
                return _row_loss_sums(self.model(input_ids=ids, attention_mask=mask).logits, labels)
        self.model.set_adapter(user)
        for p in self.params(user):
            p.requires_grad_(True)
        return _row_loss_sums(self.model(input_ids=ids, attention_mask=mask).logits, labels)

    def state(self, user: str) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().cpu() for n, p in self._named(user).items()}

    def load_state(self, user: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._named(user).items():
                p.copy_(state[n])

    def served_params(self, user: str) -> int:
        return sum(p.numel() for p in self.params(user))


class GroupedScorer:
    """A Scorer over a method: rows of one user per forward when the method cannot mix users."""

    def __init__(self, method):
        self.method = method

    @torch.no_grad()
    def loss_sums(self, rows, users):
        if self.method.mixes_users:
            s, c = self.method.loss_sums(rows, users)
            return s.detach().cpu(), c.cpu()
        sums, counts = torch.zeros(len(rows)), torch.zeros(len(rows))
        for u in dict.fromkeys(users):
            idx = [i for i, v in enumerate(users) if v == u]
            s, c = self.method.loss_sums([rows[i] for i in idx], [u] * len(idx))
            sums[idx], counts[idx] = s.detach().cpu().float(), c.cpu()
        return sums, counts


def artifact_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of the served form: the tensors as float16 safetensors (as prefixes are exported)."""
    return len(st_save({k: v.to(torch.float16).contiguous() for k, v in state.items()}))


@dataclass
class _Run:
    user: str
    train: list[Example]
    val: list[Example]
    optimizer: torch.optim.Optimizer
    schedule: object
    order: random.Random
    best_state: dict
    stream: list[int] = field(default_factory=list)
    steps: int = 0
    best_val: float = math.inf
    best_step: int = 0
    initial_val: float | None = None
    bad_evals: int = 0
    done: bool = False
    last_loss: float = float("nan")

    def next_batch(self, n: int) -> list[Example]:
        while len(self.stream) < n:
            epoch = list(range(len(self.train)))
            self.order.shuffle(epoch)
            self.stream.extend(epoch)
        picked, self.stream = self.stream[:n], self.stream[n:]
        return [self.train[i] for i in picked]


def train_baseline(
    base: BaseModel,
    method,
    users: list[UserData],
    config: TrainingConfig,
    on_step: Callable[[int, float, float | None], None] | None = None,
) -> dict[str, dict]:
    """Train `method` for every user with train_prefixes' data split, schedule, steps and early stopping.

    Returns per-user metrics; the method is left holding each user's best-validation state.
    """
    started = time.monotonic()
    runs = []
    for data in users:
        samples = prepare_samples(data.samples)
        train, val = split_samples(samples, config.val_fraction, config.seed)
        method.add_user(data.user_id, train)
        optimizer = torch.optim.AdamW(method.params(data.user_id), lr=config.learning_rate, weight_decay=config.weight_decay)
        runs.append(
            _Run(
                user=data.user_id,
                train=build_examples(base.tokenizer, train, config.max_seq_len, config.formats),
                val=build_examples(base.tokenizer, val, config.max_seq_len, config.formats),
                optimizer=optimizer,
                schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear(config)),
                order=random.Random(config.seed),
                best_state=method.state(data.user_id),
            )
        )
    scorer = GroupedScorer(method)

    def validate(active: list[_Run]) -> list[float]:
        rows = [ex for r in active for ex in r.val]
        tags = [r.user for r in active for _ in r.val]
        from core.evaluation.metrics import score_rows

        sums, counts = score_rows(scorer, rows, tags, chunk=config.batch_size * 2)
        out, k = [], 0
        for r in active:
            n = len(r.val)
            out.append(float(sums[k : k + n].sum() / max(counts[k : k + n].sum(), 1)))
            k += n
        return out

    with_val = [r for r in runs if r.val]
    for r, loss in zip(with_val, validate(with_val) if with_val else []):
        r.initial_val = r.best_val = loss
    for step in range(1, config.max_steps + 1):
        active = [r for r in runs if not r.done]
        if not active or (config.time_budget_s and time.monotonic() - started > config.time_budget_s):
            break
        for r in active:
            r.optimizer.zero_grad(set_to_none=True)
        groups = [active] if method.mixes_users else [[r] for r in active]
        for group in groups:
            rows, tags = [], []
            for r in group:
                batch = r.next_batch(config.batch_size)
                rows += batch
                tags += [r.user] * len(batch)
            sums, counts = method.loss_sums(rows, tags)
            total = 0
            for r in group:
                idx = [i for i, t in enumerate(tags) if t == r.user]
                loss = sums[idx].sum() / counts[idx].sum().clamp(min=1)  # this user's token mean
                r.last_loss = float(loss.detach())
                total = total + loss
            total.backward()  # sum of per-user means: each user's gradient is its own loss's
        for r in active:
            params = method.params(r.user)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            r.optimizer.step()
            r.schedule.step()
            r.steps += 1
        due = [r for r in active if r.val and (r.steps % config.eval_every == 0 or r.steps == config.max_steps)]
        val_mean = None
        if due:
            losses = validate(due)
            val_mean = sum(losses) / len(losses)
            for r, loss in zip(due, losses):
                if loss < r.best_val - 1e-4:
                    r.best_val, r.best_step, r.bad_evals = loss, r.steps, 0
                    r.best_state = method.state(r.user)
                else:
                    r.bad_evals += 1
                    r.done = r.bad_evals >= config.patience
        if on_step is not None:
            on_step(step, sum(r.last_loss for r in active) / len(active), val_mean)
    seconds = time.monotonic() - started
    results = {}
    for r in runs:
        if not r.val:
            r.best_state = method.state(r.user)
        method.load_state(r.user, r.best_state)
        results[r.user] = {
            "steps": r.steps,
            "best_step": r.best_step,
            "val_loss": None if math.isinf(r.best_val) else r.best_val,
            "initial_val_loss": r.initial_val,
            "train_examples": len(r.train),
            "train_seconds": seconds / len(runs),
            "served_params": method.served_params(r.user),
            "artifact_bytes": artifact_bytes(r.best_state),
        }
    return results
