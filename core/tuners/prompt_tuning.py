"""Prompt tuning (Lester et al. 2021), an evaluation baseline (method `prompt`): P trainable input
embeddings per user placed before the tokens; the frozen model is unchanged, and rows of many users
mix in one forward as prefixes do."""

from __future__ import annotations

import torch
from torch import nn

from core.engine.model import BaseModel
from core.tuners.base import UserData, once_per_module
from core.tuners.prefix import init_tokens
from core.tuners.registry import PROMPT


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
