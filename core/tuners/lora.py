"""A LoRA per user (methods `lora` and PT-PEFT's second stage): per-row deltas in the shared forward."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from core.engine import lora
from core.engine.adaptation import Adaptation
from core.engine.lora import LoRABatch, LoRAConfig, LoRAModule, LoRAWeights, target_modules
from core.engine.model import BaseModel
from core.engine.prefix import PrefixConfig, PrefixEncoder, prefix_hidden_states
from core.tuners.base import TrainedAdaptation, UserData, once_per_module
from core.tuners.loop import train_users
from core.tuners.prefix import StoredPrefix, stored_parts
from core.tuners.registry import LORA


class FixedLoRA(nn.Module):
    """A stored LoRA (or none) in a trainable LoRA's place: calling it returns the weights."""

    def __init__(self, weights: LoRAWeights | None):
        super().__init__()
        self.weights = weights

    def forward(self) -> LoRAWeights | None:
        return self.weights


class UserAdapter(nn.Module):
    """One user's LoRA, and the prefix (trainable or frozen) their rows carry under it, if any."""

    def __init__(self, lora_module: LoRAModule, prefix: nn.Module | None):
        super().__init__()
        self.lora = lora_module
        self.prefix = prefix


class LoRAMethod:
    """Per-user LoRA in the shared forward (core/engine/lora.py): rows of any users mix in one pass, each
    row gathering its own user's A and B; the base weights are never touched.

    A user with `prefix_kv` (PT-PEFT's second stage: the prefix from its first stage) carries that
    prefix on every row under the LoRA, frozen, or trained on with the LoRA when `train_prefix`."""

    mixes_users = True

    def __init__(self, base: BaseModel, config: LoRAConfig, *, train_prefix: bool = False):
        self.base, self.config, self.train_prefix = base, config, train_prefix
        self.shapes = target_modules(base.model, config.targets)

    def new_user(self, data: UserData, train_texts: list[str], generator: torch.Generator) -> UserAdapter:
        prefix = None
        if data.prefix_kv is not None:
            if self.train_prefix:  # the stage-1 KV as a raw trainable tensor (its MLP is not needed)
                config = PrefixConfig(prefix_len=data.prefix_kv.shape[3], reparameterize=False)
                prefix = PrefixEncoder(self.base.geometry, config, data.prefix_kv)
            else:
                prefix = StoredPrefix(data.prefix_kv.float())
        return UserAdapter(LoRAModule(self.shapes, self.config, generator), prefix).to(self.base.device)

    def hidden_states(self, ids, mask, modules):
        kvs = once_per_module(modules, lambda m: None if m.prefix is None else m.prefix())
        loras = once_per_module(modules, lambda m: m.lora())
        batch = LoRABatch.from_rows(loras, device=self.base.device, dtype=self.base.dtype)
        with lora.active(self.base.model, batch):
            return prefix_hidden_states(self.base, ids, mask, kvs)

    def stored_user(self, data: UserData, stored) -> nn.Module:
        """A stored version (a prefix KV, or an Adaptation of any method) as a frozen user module."""
        kv, weights = stored_parts(stored, self.base)
        return UserAdapter(FixedLoRA(weights), None if kv is None else StoredPrefix(kv))

    def export(self, module: UserAdapter) -> tuple[torch.Tensor | None, LoRAWeights]:
        """(prefix KV (L, 2, H, P, D) fp32 or None, LoRA weights fp32), on CPU."""
        kv = None if module.prefix is None else module.prefix().detach().float().cpu().contiguous()
        return kv, module.lora.export()


def train_loras(base, users, config, on_progress, should_cancel, method=LORA) -> list[TrainedAdaptation]:
    # A LoRA starts from its own initialisation: an earlier prefix's training state does not apply.
    users = [replace(u, resume_state=None, companions=None) for u in users]
    lora_method = LoRAMethod(base, config.lora, train_prefix=config.pt_peft_train_prefix)
    trained = train_users(base, lora_method, users, config, on_progress=on_progress, should_cancel=should_cancel)
    results = []
    for t in trained:
        kv, weights = lora_method.export(t.module)
        results.append(TrainedAdaptation(t.user_id, method, Adaptation(kv, weights), {**t.metrics, "method": method}))
    return results
