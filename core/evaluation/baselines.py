"""Baselines trained through the one training loop (core/tuners/loop.py), exactly as prefixes are.

Data split, step budget, epochs, time budget, schedule, preservation term, early stopping and
checkpoint selection are the loop's; a baseline only says what a user trains and how it enters the
forward pass (core/tuners/prefix.py's TuningMethod).

- Prompt tuning (Lester et al. 2021): P trainable input embeddings per user placed before the tokens;
  the frozen model is unchanged. Mixed-user batches work as for prefixes.
- LoRA (Hu et al. 2021) via PEFT, an optional extra: one adapter per user on a private copy of the base
  model (PEFT would otherwise patch the shared model in place). PEFT runs one adapter per forward, so
  the loop runs one forward/backward per user (its anchors for the preservation term included).
Full fine-tuning is not offered: a 135M-parameter copy plus AdamW state per user (~2 GB) and a full
backward per user-step does not fit this harness's CPU budget.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from safetensors.torch import save as st_save
from torch import nn

from core.engine.model import BaseModel
from core.tuners.base import Progress, TrainingConfig, UserData, once_per_module
from core.tuners.loop import loss_sums, train_users
from core.tuners.prefix import init_tokens
from core.tuners.registry import PEFT_LORA, PROMPT

LORA_TARGETS = ("q_proj", "v_proj")


def lora_rank_for(base: BaseModel, target_params: int, targets=LORA_TARGETS) -> tuple[int, int]:
    """(rank, trainable params) of the LoRA whose parameter count is closest to `target_params`."""
    per_rank = 0
    for name, module in base.model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            per_rank += module.in_features + module.out_features
    rank = max(1, round(target_params / per_rank))
    return rank, rank * per_rank


class _SoftPrompt(nn.Module):
    """One user's soft prompt: `forward()` returns the (P, hidden) input embeddings."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(start)

    def forward(self) -> torch.Tensor:
        return self.prompt


class PromptTuning:
    """Per-user soft prompts (P, hidden) over `inputs_embeds`; rows of any users share one forward."""

    name = PROMPT
    mixes_users = True

    def __init__(self, base: BaseModel, prompt_len: int):
        self.base, self.prompt_len = base, prompt_len
        self.modules: dict[str, _SoftPrompt] = {}  # by user id, for scoring after training

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> _SoftPrompt:
        # Start from the embeddings of the user's own first tokens (Lester et al.'s vocab init).
        ids = init_tokens(self.base.tokenizer, train_texts, self.prompt_len)
        table = self.base.model.get_input_embeddings().weight
        module = _SoftPrompt(table[torch.tensor(ids, device=table.device)].detach().float().clone())
        self.modules[data.user_id] = module
        return module

    def hidden_states(self, ids, mask, modules):
        P = self.prompt_len
        embeds = self.base.model.get_input_embeddings()(ids)  # (B, T, hidden)
        zero = torch.zeros(P, embeds.shape[-1], device=embeds.device)
        row_prompts = [zero if p is None else p for p in once_per_module(modules, lambda m: m())]
        prompts = torch.stack(row_prompts).to(embeds.dtype)  # (B, P, hidden)
        prompt_mask = torch.tensor([[0 if m is None else 1] * P for m in modules], device=mask.device)
        full_mask = torch.cat([prompt_mask, mask], dim=1)  # (B, P + T)
        positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)  # unprompted rows start at position 0
        out = self.base.model.base_model(
            inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=full_mask, position_ids=positions
        )
        return out.last_hidden_state[:, P:]  # (B, T, hidden): the tokens' positions only

    def export(self, module: _SoftPrompt) -> dict[str, torch.Tensor]:
        return {"prompt": module.prompt.detach().clone().cpu()}


class _Adapter(nn.Module):
    """One user's LoRA weights: the very Parameters inside the PEFT model (not copies), so the
    loop's optimizer steps and best-checkpoint restore act on the adapter the model runs."""

    def __init__(self, user: str, named: dict[str, nn.Parameter]):
        super().__init__()
        self.user, self.names = user, list(named)
        self.weights = nn.ParameterList(named.values())


class LoRA:
    """One PEFT LoRA adapter per user on a private copy of the base model."""

    name = PEFT_LORA
    mixes_users = False

    def __init__(self, base: BaseModel, rank: int, targets=LORA_TARGETS, alpha: float | None = None):
        from peft import LoraConfig, get_peft_model  # optional extra: pip install 'steer[eval]'

        self.base, self.rank = base, rank
        self.config = LoraConfig(
            r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0, bias="none"
        )
        self._get_peft_model = get_peft_model
        self.model = None
        self.modules: dict[str, _Adapter] = {}  # by user id (= adapter name)

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> _Adapter:
        user = data.user_id
        if self.model is None:
            self.model = self._get_peft_model(copy.deepcopy(self.base.model), self.config, adapter_name=user)
        else:
            self.model.add_adapter(user, self.config)
        named = {n: p for n, p in self.model.named_parameters() if f".{user}." in n and "lora_" in n}
        with torch.no_grad():
            # PEFT's own initialisation of A (kaiming, a=sqrt(5); B = 0) draws from the global RNG,
            # so it would depend on who was added before: redraw it from this user's generator.
            for name, p in named.items():
                if "lora_A" in name:
                    p.copy_(nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=generator))
        module = _Adapter(user, named)
        self.modules[user] = module
        return module

    def hidden_states(self, ids, mask, modules):
        (module,) = set(modules)  # the loop gives this method rows of one user (or the base) at a time
        decoder = self.model.get_base_model().base_model  # the decoder, its layers patched by PEFT
        if module is None:
            with self.model.disable_adapter():
                return decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        self.model.set_adapter(module.user)
        for p in module.parameters():  # set_adapter may leave a freshly added adapter frozen
            p.requires_grad_(True)
        return decoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def export(self, module: _Adapter) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().cpu() for n, p in zip(module.names, module.weights)}


class GroupedScorer:
    """A Scorer (core/evaluation/metrics.py) over a trained baseline, rows tagged by user id (None =
    base model), scored by the training loop's own `loss_sums` (one user per forward when the
    method cannot mix users)."""

    def __init__(self, method):
        self.method = method

    def loss_sums(self, rows, users):
        modules = [None if u is None else self.method.modules[u] for u in users]
        sums, counts = loss_sums(self.method.base, self.method, rows, modules)
        return sums.cpu(), counts.cpu()


def artifact_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of the served form: the tensors as float16 safetensors (as prefixes are exported)."""
    return len(st_save({k: v.to(torch.float16).contiguous() for k, v in state.items()}))


def train_baseline(
    base: BaseModel,
    method,
    users: list[UserData],
    config: TrainingConfig,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, dict]:
    """Train `method` for every user through the training loop of prefixes (core/tuners/loop.py).

    Returns per-user metrics; the method is left holding each user's best-validation state.
    """
    started = time.monotonic()
    trained = train_users(base, method, users, config, on_progress=on_progress)
    seconds = time.monotonic() - started
    results = {}
    for t in trained:
        served = method.export(t.module)
        results[t.user_id] = {
            **t.metrics,
            "train_seconds": seconds / len(trained),
            "served_params": sum(v.numel() for v in served.values()),
            "artifact_bytes": artifact_bytes(served),
        }
    return results
