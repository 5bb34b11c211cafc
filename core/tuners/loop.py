"""The training loop of every tuning method: one user, or many users sharing every forward/backward pass.

A method (core/tuners/base.py's TuningMethod, one module per method in core/tuners/, listed in
core/tuners/registry.py) supplies each user's trainable module and how it enters the forward pass;
everything else lives here once. Each user keeps their own module, optimizer, schedule, data order
and early-stopping state; only the forward/backward pass over the frozen base is shared. The loss is
a *sum over users* of each user's own token-mean loss, so user u's gradient is exactly the gradient
of u's loss alone: training K users together gives each of them what training them alone would
(same seed, same data order), up to float rounding from padding. That makes batch retraining of many
users cost about one job, not K. A method that cannot mix users in one forward gets one
forward/backward per user from the same loop.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import nn
from torch.nn import functional as F

from core.engine.data import IGNORE, Example, build_examples, prepare_samples, split_samples
from core.engine.model import BaseModel
from core.engine.precision import computing_in, resolve_compute_dtype
from core.engine.prefix import prefix_hidden_states
from core.errors import InvalidTrainingData, TrainingCancelled
from core.tuners.base import Progress, TrainedUser, TrainingConfig, TuningMethod, UserData
from core.tuners.preference import (
    NO_PREFERENCE_LOSS,
    OBJECTIVE_DPO,
    OBJECTIVES,
    PairRows,
    dpo_losses,
    pair_rows,
    preference_score,
)
from core.tuners.preservation import Anchors, base_anchors, kl_from_base


class _UserRun:
    """Everything one user owns during a (possibly shared) training job."""

    def __init__(self, base: BaseModel, method: TuningMethod, data: UserData, config: TrainingConfig):
        self.user_id = data.user_id
        self.prefers = config.objective == OBJECTIVE_DPO
        if self.prefers:
            train, self.train, self.val = _pair_split(base, method, data, config)
            val = self.val
        else:
            samples = prepare_samples(data.samples) if data.examples is None else list(data.examples)
            if not samples:
                raise InvalidTrainingData(f"user {data.user_id}: no usable writing samples")
            train, val = split_samples(samples, config.val_fraction, config.seed)
            if data.examples is not None:
                self.train, self.val = train, val
            else:
                self.train, self.val = _examples(base, method, train, config), _examples(base, method, val, config)
        if not self.train:
            raise InvalidTrainingData(f"user {data.user_id}: samples too short to train on")
        # A generator of the user's own, not one drawn from by every user in turn: a user
        # initialises the same alone or beside others.
        self.module = method.new_user(data, train, torch.Generator().manual_seed(config.seed))
        if data.resume_state is not None:
            self.module.load_state_dict(data.resume_state)
        self.reference = None if data.reference_kv is None else method.stored_user(data, data.reference_kv)
        self.reference_val: float | None = None
        # Every parameter of the module, whatever its requires_grad now: PEFT flips that flag on
        # the adapters it is not running, and a user's optimizer must still own all of theirs.
        self.params = list(self.module.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_then_linear(config))
        self.order = random.Random(config.seed)
        self.stream: list[int] = []
        self.max_steps = config.max_steps
        if config.epochs is not None:
            per_epoch = math.ceil(len(self.train) / config.batch_size)
            self.max_steps = min(config.max_steps, max(1, math.ceil(config.epochs * per_epoch)))
        self.steps = 0
        self.tokens = 0
        self.anchor_cursor = 0
        self.last_loss = float("nan")
        self.last_kl: float | None = None
        self.best_val = math.inf
        self.best_step = 0
        self.base_val: float | None = None
        self.initial_val: float | None = None
        self.bad_evals = 0
        self.done = False
        self.stopped_early = False
        self.best_state = _snapshot(self.module)
        self.n_train_samples, self.n_val_samples = len(train), len(val)
        self.preference = None  # objective 'dpo': the held-out PreferenceScore of the best checkpoint
        self.initial_preference = None

    def next_batch(self, batch_size: int) -> list[Example]:
        """The next `batch_size` examples of this user's own seeded, epoch-by-epoch shuffled stream."""
        while len(self.stream) < batch_size:
            epoch = list(range(len(self.train)))
            self.order.shuffle(epoch)
            self.stream.extend(epoch)
        picked, self.stream = self.stream[:batch_size], self.stream[batch_size:]
        return [self.train[i] for i in picked]

    def record_eval(self, val_loss: float, patience: int, preference=None) -> None:
        if val_loss < self.best_val - 1e-4:
            self.best_val, self.best_step, self.bad_evals = val_loss, self.steps, 0
            self.best_state = _snapshot(self.module)
            self.preference = preference
        else:
            self.bad_evals += 1
            if self.bad_evals >= patience:
                self.done, self.stopped_early = True, True

    def result(self, started: float, compute_dtype: str) -> TrainedUser:
        if not self.val:  # nothing to select on: the last state is the result
            self.best_state = _snapshot(self.module)
        self.module.load_state_dict(self.best_state)
        metrics = {
            "steps": self.steps,
            "best_step": self.best_step,
            "train_loss": self.last_loss,
            "val_loss": None if math.isinf(self.best_val) else self.best_val,
            "initial_val_loss": self.initial_val,
            "base_val_loss": self.base_val,
            "reference_val_loss": self.reference_val,
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "train_samples": self.n_train_samples,
            "val_samples": self.n_val_samples,
            "tokens": self.tokens,
            "preservation_kl": self.last_kl,
            "stopped_early": self.stopped_early,
            "train_seconds": round(time.monotonic() - started, 3),
            "compute_dtype": compute_dtype,
        }
        if self.prefers:
            metrics["objective"] = OBJECTIVE_DPO
            metrics["preference"] = None if self.preference is None else asdict(self.preference)
            metrics["initial_preference"] = None if self.initial_preference is None else asdict(self.initial_preference)
        return TrainedUser(self.user_id, self.module, dict(self.best_state), metrics)


def check_fits_context(base: BaseModel, users: list[UserData], config: TrainingConfig) -> None:
    """A prefix and the longest row must fit the base model's context window: past it, models with
    learned positions (GPT-2) index out of range and rotary ones silently extrapolate."""
    lengths = [
        (u.prefix or config.prefix).prefix_len + max((kv.shape[3] for kv in u.companions or ()), default=0)
        for u in users
    ] + list(config.prefix_len_candidates)
    longest_row = max(config.max_seq_len, config.preservation_len + 1 if config.preservation_weight > 0 else 0)
    if max(lengths, default=0) + longest_row > base.max_context:
        raise InvalidTrainingData(
            f"prefix of {max(lengths)} tokens plus rows of up to {longest_row} tokens exceed the base "
            f"model's context window of {base.max_context} tokens"
        )


def train_users(
    base: BaseModel,
    method: TuningMethod,
    users: list[UserData],
    config: TrainingConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainedUser]:
    """Train `method` for every user (in `users`' order), sharing forward/backward passes as far
    as the method allows; each user's result equals training them alone."""
    if not users:
        raise InvalidTrainingData("no users to train")
    if len({u.user_id for u in users}) != len(users):
        raise InvalidTrainingData("a user appears twice in one training job")
    if config.objective not in OBJECTIVES:
        raise InvalidTrainingData(f"objective must be one of {OBJECTIVES}, not {config.objective!r}")
    config = replace(config, compute_dtype=resolve_compute_dtype(config.compute_dtype, base.device))
    with computing_in(config.compute_dtype, base.device):
        return _train(base, method, users, config, on_progress, should_cancel)


def _train(base, method, users, config, on_progress, should_cancel) -> list[TrainedUser]:
    """The loop of `train_users`, inside the job's precision."""
    started = time.monotonic()
    base.model.requires_grad_(False)
    runs = [_UserRun(base, method, u, config) for u in users]
    anchors = None
    if config.preservation_weight > 0 and getattr(method, "preserves", True):
        anchors = base_anchors(
            base, config.preservation_anchors, config.preservation_len, config.seed, config.preservation_prompts
        )
    _evaluate(base, method, runs, config, initial=True)
    step = 0
    total_steps = max(r.max_steps for r in runs)
    while True:
        active = [r for r in runs if not r.done and r.steps < r.max_steps]
        if not active:
            break
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled("training cancelled")
        if config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s:
            break
        step_started = time.monotonic()
        tokens = _train_step(base, method, active, config, anchors)
        step += 1
        due = [r for r in active if r.val and r.steps % config.eval_every == 0]
        if due:
            _evaluate(base, method, due, config)
        if on_progress is not None:
            on_progress(_progress(step, total_steps, active, tokens, started, step_started))
    final = [r for r in runs if r.val and not r.done and r.steps % config.eval_every != 0]
    _evaluate(base, method, final, config)  # the last steps may hold the best validation loss
    return [r.result(started, config.compute_dtype) for r in runs]


def _progress(step: int, total_steps: int, active: list[_UserRun], tokens: int, started: float, step_started: float):
    elapsed = time.monotonic() - started
    seconds = max(time.monotonic() - step_started, 1e-9)
    evaluated = [r.best_val for r in active if not math.isinf(r.best_val)]
    return Progress(
        step=step,
        max_steps=total_steps,
        active_users=len(active),
        loss=sum(r.last_loss for r in active) / len(active),
        val_loss=sum(evaluated) / len(evaluated) if evaluated else None,
        tokens_per_s=tokens / seconds,
        elapsed_s=elapsed,
        eta_s=elapsed / step * max(total_steps - step, 0),
    )


def _train_step(
    base: BaseModel, method: TuningMethod, runs: list[_UserRun], config: TrainingConfig, anchors: Anchors | None
) -> int:
    """One optimizer step for every run: one shared forward/backward pass (or one per group of
    `config.users_per_pass` users), or one per user when the method cannot mix users (gradients land
    in each user's own parameters either way)."""
    for run in runs:
        run.optimizer.zero_grad(set_to_none=True)
    size = (config.users_per_pass or len(runs)) if method.mixes_users else 1
    groups = [runs[i : i + size] for i in range(0, len(runs), size)]
    tokens = sum(_backward_group(base, method, group, config, anchors) for group in groups)
    for run in runs:
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
        run.optimizer.step()
        run.schedule.step()
        run.steps += 1
    return tokens


def _backward_group(
    base: BaseModel, method: TuningMethod, runs: list[_UserRun], config: TrainingConfig, anchors: Anchors | None
) -> int:
    """Forward + backward of one batch of `runs`' rows; returns the scored training tokens."""
    rows, owners, batches = [], [], []
    for index, run in enumerate(runs):
        batch = run.next_batch(config.batch_size)
        batches.append(batch)
        own = _pair_examples(batch) if run.prefers else batch
        rows.extend(own)
        owners.extend([index] * len(own))
    picked = []  # one anchor index per user, each user cycling on its own
    if anchors is not None:
        for run in runs:
            picked.append(run.anchor_cursor % len(anchors))
            run.anchor_cursor += 1
    modules = [runs[o].module for o in owners]
    if anchors is None:
        token_sums, token_counts = _row_losses(base, method, rows, modules)
    else:  # the anchors ride in the same forward as the user's rows
        all_rows = rows + [anchors.examples[k] for k in picked]
        hidden, labels = _method_hidden_states(base, method, all_rows, modules + [run.module for run in runs])
        token_sums, token_counts = _row_sums(*_scored_losses(base, hidden[: len(rows)], labels[: len(rows)]))
    per_user, counts = _per_user_mean(token_sums, token_counts, owners, len(runs))  # (U,), (U,)
    if config.objective == OBJECTIVE_DPO:  # every run of a job has the job's objective
        per_user = _dpo_per_user(token_sums, batches, config.dpo_beta)
    objective = per_user
    if anchors is not None:
        # One LM-head call per anchor row: one call over all rows was measured 4-19% slower on the
        # CPU (8 users, forward + backward), likely its users x tokens x vocabulary intermediates.
        kl = torch.stack(
            [
                kl_from_base(
                    hidden[len(rows) + j, : len(anchors.examples[k].input_ids)],
                    base,
                    anchors.log_probs[k],
                    anchors.first_position(k),
                )
                for j, k in enumerate(picked)
            ]
        )  # (U,)
        objective = per_user + config.preservation_weight * kl
        for run, value in zip(runs, kl.detach().tolist()):
            run.last_kl = value
    # Sum of per-user means: each user's gradient is that of their own loss alone.
    objective.sum().backward()
    for index, run in enumerate(runs):
        run.tokens += int(counts[index])
        run.last_loss = float(per_user[index].detach())
    return int(counts.sum())


@torch.no_grad()
def _evaluate(
    base: BaseModel, method: TuningMethod, runs: list[_UserRun], config: TrainingConfig, initial: bool = False
) -> None:
    """Validation loss per user (token mean over their validation examples), users batched together."""
    if config.objective == OBJECTIVE_DPO:
        _evaluate_preferences(base, method, runs, config, initial)
        return
    runs = [r for r in runs if r.val]
    if not runs:
        return
    losses = _mean_loss_over(base, method, runs, lambda run: run.module, config.batch_size * 2)
    if initial:
        base_losses = _mean_loss_over(base, method, runs, lambda run: None, config.batch_size * 2)
        for run, loss, base_loss in zip(runs, losses, base_losses):
            run.initial_val, run.base_val = loss, base_loss
            run.best_val = loss
        compared = [r for r in runs if r.reference is not None]
        if compared:  # the same rows and scorer as the user's own prefix, in passes of their own
            references = _mean_loss_over(base, method, compared, lambda run: run.reference, config.batch_size * 2)
            for run, loss in zip(compared, references):
                run.reference_val = loss
        return
    for run, loss in zip(runs, losses):
        run.record_eval(loss, config.patience)


def _evaluate_preferences(base, method, runs: list[_UserRun], config: TrainingConfig, initial: bool) -> None:
    """Held-out DPO loss per user (what early stopping selects on) and its preference score; first
    of all, the reference's log-likelihood of every pair, training and held-out, once."""
    chunk = config.batch_size * 2
    if initial:  # every run's pairs, held-out ones or not
        for run, (sums, _) in zip(runs, _pair_sums(base, method, runs, _all_pairs, _reference_of, chunk)):
            for pair, (preferred, rejected) in zip(_all_pairs(run), sums):
                pair.reference_preferred, pair.reference_rejected = -preferred, -rejected
    runs = [r for r in runs if r.val]
    for run, (sums, counts) in zip(runs, _pair_sums(base, method, runs, lambda r: r.val, lambda r: r.module, chunk)):
        score = preference_score(run.val, sums, counts, config.dpo_beta)
        if initial:
            run.initial_val, run.best_val, run.initial_preference = score.loss, score.loss, score
            run.preference = score
            run.reference_val = NO_PREFERENCE_LOSS  # the reference against itself: a zero margin
        else:
            run.record_eval(score.loss, config.patience, score)


def _all_pairs(run: _UserRun) -> list[PairRows]:
    return run.train + run.val


def _reference_of(run: _UserRun):
    return run.reference  # None: the base model


def _pair_sums(base, method, runs: list[_UserRun], pairs_of, module_of, chunk: int):
    """Per run: [(preferred, rejected) summed negative log-likelihood per pair], [preferred tokens]."""
    rows = [(i, row) for i, run in enumerate(runs) for row in _pair_examples(pairs_of(run))]
    sums: list[float] = []
    counts: list[float] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        modules = [module_of(runs[i]) for i, _ in part]
        token_sums, token_counts = loss_sums(base, method, [row for _, row in part], modules)
        sums.extend(token_sums.double().cpu().tolist())
        counts.extend(token_counts.double().cpu().tolist())
    per_run, at = [], 0
    for run in runs:
        n = 2 * len(pairs_of(run))
        mine, tokens = sums[at : at + n], counts[at : at + n]
        per_run.append((list(zip(mine[0::2], mine[1::2])), tokens[0::2]))
        at += n
    return per_run


def _pair_examples(pairs: list[PairRows]) -> list[Example]:
    """Each pair's two rows, preferred first: the order `_dpo_per_user` reads them back in."""
    return [row for pair in pairs for row in (pair.preferred, pair.rejected)]


def _dpo_per_user(token_sums: torch.Tensor, batches: list[list[PairRows]], beta: float) -> torch.Tensor:
    """(U,) each user's mean DPO loss over their pairs in this step, from the rows' summed negative
    log-likelihoods (in `_pair_examples` order, users one after another)."""
    nll = token_sums.view(-1, 2)  # (pairs, [preferred, rejected])
    references = torch.tensor(
        [[p.reference_preferred, p.reference_rejected] for batch in batches for p in batch],
        dtype=nll.dtype,
        device=nll.device,
    )
    losses, _ = dpo_losses(-nll[:, 0], -nll[:, 1], references[:, 0], references[:, 1], beta)
    owners = torch.tensor([i for i, batch in enumerate(batches) for _ in batch], device=nll.device)
    totals = torch.zeros(len(batches), dtype=losses.dtype, device=nll.device).index_add(0, owners, losses)
    sizes = torch.tensor([len(batch) for batch in batches], dtype=losses.dtype, device=nll.device)
    return totals / sizes


def _pair_split(base: BaseModel, method: TuningMethod, data: UserData, config: TrainingConfig):
    """(preferred training answers, training pairs, held-out pairs) of a DPO user, split like samples."""
    if hasattr(method, "loss_sums") or hasattr(method, "examples"):
        raise InvalidTrainingData("preference tuning (DPO) needs a decoder-only base model")
    if not data.pairs:
        raise InvalidTrainingData(f"user {data.user_id}: no preference pairs to train on")
    train, val = split_samples(list(data.pairs), config.val_fraction, config.seed)
    rows = [pair_rows(base.tokenizer, pair, config.max_seq_len) for pair in train]
    held_out = [pair_rows(base.tokenizer, pair, config.max_seq_len) for pair in val]
    return [pair.preferred for pair in train], rows, held_out


def _mean_loss_over(base, method, runs: list[_UserRun], module_of, chunk: int) -> list[float]:
    rows = [(i, ex) for i, run in enumerate(runs) for ex in run.val]
    sums = torch.zeros(len(runs), dtype=torch.float64)
    counts = torch.zeros(len(runs), dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        owners = [i for i, _ in part]
        modules = [module_of(runs[i]) for i in owners]
        token_sums, token_counts = loss_sums(base, method, [ex for _, ex in part], modules)
        sums.index_add_(0, torch.tensor(owners), token_sums.double().cpu())
        counts.index_add_(0, torch.tensor(owners), token_counts.double().cpu())
    return (sums / counts.clamp(min=1)).tolist()


@torch.no_grad()
def loss_sums(base: BaseModel, method: TuningMethod, rows: list[Example], modules: list[nn.Module | None]):
    """Per row, summed next-token loss and scored-token count ((B,), (B,)), row i under modules[i]
    (None = base model); rows of different users in one forward only when the method allows it."""
    if method.mixes_users:
        groups = [list(range(len(rows)))]
    else:
        by_module: dict[int, list[int]] = {}
        for i, m in enumerate(modules):
            by_module.setdefault(id(m), []).append(i)
        groups = list(by_module.values())
    sums = torch.zeros(len(rows), device=base.device)
    counts = torch.zeros(len(rows), device=base.device)
    for group in groups:
        sums[group], counts[group] = _row_losses(base, method, [rows[i] for i in group], [modules[i] for i in group])
    return sums, counts


def _row_losses(base: BaseModel, method: TuningMethod, rows: list, modules: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, summed loss and scored-token count ((B,), (B,)): the method's own scoring when it has
    one (seq2seq rows), else its hidden states under the base model's LM head on scored tokens."""
    if hasattr(method, "loss_sums"):
        return method.loss_sums(rows, modules)
    hidden, labels = _method_hidden_states(base, method, rows, modules)
    return _row_sums(*_scored_losses(base, hidden, labels))


def _examples(base: BaseModel, method: TuningMethod, texts: list[str], config: TrainingConfig) -> list:
    """A user's samples as training rows: the method's own form if it has one, else plain and chat
    examples for a decoder."""
    if hasattr(method, "examples"):
        return method.examples(texts, config)
    return build_examples(base.tokenizer, texts, config.max_seq_len, config.formats, config.chat_requests)


def _per_user_mean(token_sums, token_counts, owners, n_users):
    """(per-user token-mean loss (U,), per-user scored token counts (U,)) from per-row sums."""
    index = torch.tensor(owners, device=token_sums.device)
    sums = torch.zeros(n_users, device=token_sums.device).index_add(0, index, token_sums)
    counts = torch.zeros(n_users, device=token_sums.device).index_add(0, index, token_counts)
    return sums / counts.clamp(min=1), counts


def token_losses(base: BaseModel, rows: list[Example], row_prefixes: list[torch.Tensor | None]):
    """Next-token cross-entropy per scored position under prefix KVs: ((B, T-1) losses, (B, T-1) scored mask)."""
    hidden, labels = _hidden_states(base, rows, row_prefixes)
    return _scored_losses(base, hidden, labels)


def _hidden_states(base: BaseModel, rows: list[Example], row_prefixes: list[torch.Tensor | None]):
    """The last hidden state of every row under its prefix KV ((B, T, H)) and the labels ((B, T))."""
    ids, mask, labels = _padded(base, rows)
    return prefix_hidden_states(base, ids, mask, row_prefixes), labels


def _method_hidden_states(base: BaseModel, method: TuningMethod, rows: list[Example], modules: list):
    """The last hidden state of every row under its user's module ((B, T, H)) and the labels ((B, T))."""
    ids, mask, labels = _padded(base, rows)
    return method.hidden_states(ids, mask, modules), labels


def _padded(base: BaseModel, rows: list[Example]):
    """Right-padded (B, T) ids, mask and labels: real tokens keep positions 0, 1, ... after whatever
    the method puts in front of them."""
    T = max(len(ex.input_ids) for ex in rows)
    device = base.device
    ids = torch.full((len(rows), T), base.tokenizer.pad_token_id, dtype=torch.long, device=device)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), T), dtype=torch.long, device=device)
    for i, ex in enumerate(rows):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return ids, mask, labels


def _scored_losses(base: BaseModel, hidden: torch.Tensor, labels: torch.Tensor):
    device = hidden.device
    targets = labels[:, 1:]
    scored = targets != IGNORE
    # The LM head (a fifth of SmolLM2's compute) runs only where a token is scored: chat templates
    # and padding cost nothing there. It is the base model's, shared by every method.
    logits = base.model.get_output_embeddings()(hidden[:, :-1][scored]).float()  # (N, V)
    losses = torch.zeros(scored.shape, dtype=logits.dtype, device=device)
    losses[scored] = F.cross_entropy(logits, targets[scored], reduction="none")
    return losses, scored


def _row_sums(losses: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed token loss and number of scored tokens."""
    return losses.sum(dim=1), scored.sum(dim=1).float()


def _warmup_then_linear(config: TrainingConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(config.max_steps - config.warmup_steps, 1)
        return max(0.1, 1.0 - (step - config.warmup_steps) / span)

    return factor


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
