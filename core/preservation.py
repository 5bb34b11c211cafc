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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from core.data import Example
from core.model import BaseModel


@dataclass
class Anchors:
    """Base-model samples and the base model's log-probabilities at each of their positions."""

    examples: list[Example]
    log_probs: list[torch.Tensor]
    """Per anchor, (len - 1, vocab) float32: the base model's prediction of each next token."""

    def __len__(self) -> int:
        return len(self.examples)


@torch.no_grad()
def sample_anchors(base: BaseModel, count: int, length: int, seed: int) -> Anchors:
    """`count` sequences of `length` tokens sampled from the bare base model (seeded)."""
    tokenizer = base.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt = torch.full((count, 1), start, dtype=torch.long, device=base.device)
    with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
        torch.manual_seed(seed)
        sampled = base.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_p=0.95,
            temperature=1.0,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=tokenizer.pad_token_id,
        )
    # Every anchor has exactly 1 + `length` tokens (min_new_tokens): one unpadded forward scores all.
    log_probs = F.log_softmax(base.model(input_ids=sampled).logits[:, :-1].float(), dim=-1)
    return Anchors([Example(row, list(row)) for row in sampled.tolist()], list(log_probs))


def kl_from_base(hidden: torch.Tensor, base: BaseModel, base_log_probs: torch.Tensor) -> torch.Tensor:
    """Token-mean KL(base || prefixed) over one anchor row: `hidden` (T, H) is the prefixed model's
    last hidden state at the anchor's positions (the last one is not scored)."""
    logits = base.model.get_output_embeddings()(hidden[:-1]).float()
    log_probs = F.log_softmax(logits, dim=-1)
    # kl_div(input=log q, target=log p) sums p * (log p - log q): KL(base || prefixed) per position.
    return F.kl_div(log_probs, base_log_probs, log_target=True, reduction="none").sum(-1).mean()
