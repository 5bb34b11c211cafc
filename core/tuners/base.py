"""The loop's inputs and outputs, and what a method implements: a job's `TrainingConfig` (shared by
every user in it), each user's `UserData`, the `TuningMethod` protocol, and what training returns
(`Progress`, `TrainedUser`, `TrainedAdaptation`). Below the loop (core/tuners/loop.py) and every
method module, so none of them needs another to name these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from core.engine.adaptation import Adaptation
from core.engine.data import FORMAT_CHAT, FORMAT_PLAIN, REQUESTS_GENERIC
from core.engine.lora import LoRAConfig
from core.engine.precision import FLOAT32
from core.engine.prefix import PrefixConfig
from core.tuners.preference import OBJECTIVE_SFT, PreferencePair
from core.tuners.preservation import ANCHOR_PROMPTS_NONE
from core.tuners.registry import PREFIX


@dataclass
class TrainingConfig:
    """Hyperparameters of one training job (shared by every user in it)."""

    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    learning_rate: float = 2e-3
    max_steps: int = 100
    """Upper bound on optimizer steps per user."""
    epochs: float | None = None
    """If set, stop each user after this many passes over their training examples (whichever first)."""
    batch_size: int = 4
    """Rows per user per step (a multi-user step holds batch_size rows of every active user)."""
    max_seq_len: int = 128
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 10
    patience: int = 3
    """Evaluations without a validation improvement before a user stops early."""
    val_fraction: float = 0.15
    formats: tuple[str, ...] = (FORMAT_PLAIN, FORMAT_CHAT)
    chat_requests: str = REQUESTS_GENERIC
    """The request of each chat example: 'generic' (one of four "write in my voice" requests) or
    'derived' (a request the sample answers, from its own topic words): core/engine/data.py."""
    time_budget_s: float | None = None
    seed: int = 0
    prefix_len_candidates: tuple[int, ...] = ()
    """If set, each user trains one prefix per candidate length, all in the same shared passes, and
    keeps the one with the lowest validation loss: prefix length stops being a knob users must tune."""
    preservation_weight: float = 0.5
    """Weight of KL(base || prefixed) on base-model samples added to each user's loss
    (core/tuners/preservation.py): keeps the prefix from changing the model on text not like the user's.
    0 turns it off (no anchors are sampled, no extra rows). 0.5 from the sweep in
    docs/EVALUATION.md: general-text perplexity 1.19x -> 0.88x base, held-out plain unchanged."""
    preservation_anchors: int = 8
    """How many anchor sequences the base model samples per job (each step uses one per user)."""
    preservation_len: int = 48
    """Tokens per anchor sequence."""
    preservation_prompts: str = ANCHOR_PROMPTS_NONE
    """What the anchors answer: 'none' (sampled from nothing: the model's text is kept) or 'requests'
    (the base model's answers to everyday requests: its instruction following is kept)."""
    method: str = PREFIX
    """What each user trains: 'prefix', 'lora', 'pt-peft' (a prefix stage, then a LoRA stage with
    that prefix kept) or 'auto' (each of them; per user, the lowest validation loss): core/tuners/registry.py."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """The LoRA of methods 'lora' and 'pt-peft'."""
    pt_peft_prefix_share: float = 0.5
    """Share of `max_steps` (and of `time_budget_s`) that PT-PEFT spends on its prefix stage."""
    pt_peft_train_prefix: bool = False
    """Whether PT-PEFT's prefix keeps training beside the LoRA in the second stage (else frozen)."""
    compute_dtype: str = FLOAT32
    """'float32'; 'bfloat16': the base model's arithmetic in bfloat16 (core/engine/precision.py), the trained
    parameters and what is exported stay float32; 'auto': bfloat16 where the hardware is fast at it."""
    objective: str = OBJECTIVE_SFT
    """'sft': each user's loss is the next-token loss of their own text; 'dpo': preference tuning
    on each user's `pairs` against a frozen reference (core/tuners/preference.py)."""
    dpo_beta: float = 0.1
    """DPO's beta: how far from its reference the policy may move for a margin (OpenAI's default)."""
    users_per_pass: int | None = None
    """At most this many users' rows in one forward/backward pass (None: all of them). A step then
    runs several passes whose gradients add up before the optimizer steps — the same gradients, as
    each user's comes from their own loss alone, in activation memory bounded by this number of
    users instead of growing with the job."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["formats"] = list(self.formats)
        data["prefix_len_candidates"] = list(self.prefix_len_candidates)
        data["lora"] = self.lora.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        data = dict(data)
        prefix = PrefixConfig(**data.pop("prefix", {}))
        lora = LoRAConfig.from_dict(data.pop("lora", {}))
        for name in ("formats", "prefix_len_candidates"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(prefix=prefix, lora=lora, **data)


@dataclass
class UserData:
    user_id: str
    samples: list[str]
    resume_state: dict[str, torch.Tensor] | None = None
    """The user module's state_dict from an earlier job (a PrefixEncoder's for prefixes): continue
    from there instead of initialising."""
    prefix: PrefixConfig | None = None
    """This user's own prefix shape, instead of the job's `config.prefix`."""
    examples: list | None = None
    """Rows already in the method's own form (e.g. synthetic seq2seq pairs), used instead of
    `samples`; they are split into training and validation rows like samples."""
    companions: list[torch.Tensor] | None = None
    """Frozen prefix KVs (L, 2, H, P, D) composed before this user's own prefix, one per row in
    turn (a control prefix trains beside users' prefixes: core/tuners/prefix.py's PrefixMethod)."""
    prefix_kv: torch.Tensor | None = None
    """A prefix KV (L, 2, H, P, D) this user's rows carry under a LoRA (core/tuners/lora.py's LoRAMethod):
    PT-PEFT's second stage gets the prefix of its first."""
    reference_kv: torch.Tensor | None = None
    """A stored prefix KV (L, 2, H, P, D) to compare the result with, e.g. the version this job may
    replace: scored once, before training, on this user's own validation rows by the same code that
    scores the user's prefix (metrics["reference_val_loss"]; None without validation rows). Methods
    with `stored_user` only (prefixes)."""
    pairs: list[PreferencePair] | None = None
    """Objective 'dpo': this user's preference pairs (split into training and held-out pairs like
    samples). The DPO reference is `reference_kv` (the active version as served), else the base model."""
    reference_composed: bool = False
    """`reference_kv` already holds every part the stored version is served with (e.g. the population
    version it trained on): scored as it is, without this user's `companions`."""


class TuningMethod(Protocol):
    mixes_users: bool
    """True when one forward may hold rows of different users (each seeing its own parameters)."""

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> nn.Module:
        """A fresh trainable module for `data.user_id`, on the base model's device. `train_texts` are
        the user's training samples (for data-dependent initialisation), `generator` seeds any random
        initialisation, so a user starts the same alone or beside others. With `data.resume_state`
        set the loop loads it into the module afterwards (initialisation may be skipped)."""
        ...

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, modules: list[nn.Module | None]) -> torch.Tensor:
        """ids, mask (B, T) right-padded; modules[i] is row i's user module or None (base model).
        Returns the last hidden state (B, T, hidden) at the rows' token positions."""
        ...

    def export(self, module: nn.Module):
        """What serving (or measuring) the user's adaptation needs: tensors, detached, on CPU."""
        ...


def once_per_module(modules: list[nn.Module | None], value: Callable[[nn.Module], torch.Tensor]) -> list:
    """value(m) per row, computed once per distinct module (a user's rows share one tensor, so one
    backward through it, not one per row); None rows stay None."""
    computed: dict[int, torch.Tensor] = {}
    for m in modules:
        if m is not None and id(m) not in computed:
            computed[id(m)] = value(m)
    return [None if m is None else computed[id(m)] for m in modules]


@dataclass
class TrainedAdaptation:
    user_id: str
    method: str
    """The method that produced `adaptation` (never 'auto')."""
    adaptation: Adaptation
    metrics: dict
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """A prefix's training state (its reparameterization) to resume from; empty for other methods."""
    prefix_config: PrefixConfig | None = None


@dataclass
class Progress:
    step: int
    max_steps: int
    active_users: int
    loss: float
    val_loss: float | None
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class TrainedUser:
    """One user's result of any method: the module holds the best validation checkpoint."""

    user_id: str
    module: nn.Module
    state: dict[str, torch.Tensor]  # module state_dict at that checkpoint, on CPU (for resuming)
    metrics: dict
