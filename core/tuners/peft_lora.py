"""LoRA through PEFT (Hu et al. 2021), an evaluation baseline (method `peft-lora`; PEFT is the
optional `eval` extra): one adapter per user on a private copy of the base model (PEFT would
otherwise patch the shared model in place). PEFT runs one adapter per forward, so the loop runs one
forward/backward per user. The service's own per-user LoRA is core/tuners/lora.py."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from core.engine.model import BaseModel
from core.tuners.base import UserData
from core.tuners.registry import PEFT_LORA

LORA_TARGETS = ("q_proj", "v_proj")


def lora_rank_for(base: BaseModel, target_params: int, targets=LORA_TARGETS) -> tuple[int, int]:
    """(rank, trainable params) of the LoRA whose parameter count is closest to `target_params`."""
    per_rank = 0
    for name, module in base.model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            per_rank += module.in_features + module.out_features
    rank = max(1, round(target_params / per_rank))
    return rank, rank * per_rank


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
