"""Per-row LoRA: every row of one forward pass may carry its own low-rank deltas, none, or several.

A LoRA (Hu et al. 2021) adds `x @ A.T @ B.T` to the output of chosen projections of the frozen
model. Serving many users' LoRAs in one batch is the Punica / S-LoRA idea; here in plain torch:

- the base projection runs once for the whole batch, exactly as without LoRA;
- per projection, the rows that carry a delta are gathered and two batched matmuls (`bmm`) compute
  every such row's delta with its own A and B at once; `index_add` puts them back. Rows without a
  LoRA are never touched, so a base row is bit-identical to the base model, and a LoRA row's result
  does not depend on its neighbours (each row has its own matrices in the `bmm`).

Weights are never merged into the model. The deltas enter through forward hooks on the named
projections (installed once, idle when no batch is active), and the batch of the current forward
is a context variable, so training threads and the serving thread can share one base model.

Shapes (r rank, `in`/`out` the projection's features, n rows carrying a delta):

    LoRAWeights.modules[name]   (A (r, in), B (out, r))     scale already folded into B
    batched, per projection      A.T (n, in, r_max), B.T (n, r_max, out)   rank zero-padded

Several LoRAs on one row (a user's and a control's) compose by concatenation along the rank:
[A1; A2] and [B1, B2] give exactly the sum of the two deltas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_TARGETS = ("q_proj", "v_proj")
"""Projections a LoRA adapts by default: attention queries and values (Hu et al.'s choice)."""
_TARGET_ALIASES = {"c_attn": ("q_proj", "k_proj", "v_proj")}
"""GPT-2 fuses q/k/v in one projection: it is adapted whenever any of q/k/v is asked for."""


@dataclass
class LoRAWeights:
    """One adapter's low-rank deltas by projection name (the model's module path), servable form:
    A (r, in) and B (out, r) with the LoRA scale already folded into B."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    def numel(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())

    def to(self, device=None, dtype=None) -> LoRAWeights:
        return LoRAWeights({n: (a.to(device, dtype), b.to(device, dtype)) for n, (a, b) in self.modules.items()})


def compose(parts: LoRAWeights | Sequence[LoRAWeights | None] | None) -> LoRAWeights | None:
    """A row's LoRAs as one: per projection, A's stacked and B's concatenated along the rank, which
    is the sum of their deltas."""
    if parts is None or isinstance(parts, LoRAWeights):
        return parts
    present = [p for p in parts if p is not None and p.modules]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    names = list(dict.fromkeys(n for p in present for n in p.modules))
    merged = {}
    for name in names:
        pairs = [p.modules[name] for p in present if name in p.modules]
        merged[name] = (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1))
    return LoRAWeights(merged)


def target_modules(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of the model's projections a LoRA on `targets`
    adapts, in model order: nn.Linear by name, and GPT-2's fused Conv1D `c_attn` for q/k/v."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        wanted = leaf in targets or any(t in targets for t in _TARGET_ALIASES.get(leaf, ()))
        if not wanted:
            continue
        if isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection: weight (in, out)
            found[name] = tuple(module.weight.shape)
    if not found:
        raise ValueError(f"the model has no projection named {', '.join(targets)} to adapt")
    return found


class LoRABatch:
    """Every row's composed LoRA for one batch, gathered per projection (what the hooks apply)."""

    def __init__(self, entries: dict[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]):
        self.entries = entries  # name -> (row index or None for every row, A.T (n, in, r), B.T (n, r, out))

    @classmethod
    def from_rows(
        cls, rows: Sequence[LoRAWeights | Sequence[LoRAWeights] | None], *, device, dtype
    ) -> LoRABatch | None:
        """None when no row carries a LoRA (the forward is then exactly the base model's).
        Differentiable: gradients flow back to each row's own A and B."""
        composed = [compose(r) for r in rows]
        if all(c is None for c in composed):
            return None
        names = list(dict.fromkeys(n for c in composed if c is not None for n in c.modules))
        entries = {}
        for name in names:
            index = [i for i, c in enumerate(composed) if c is not None and name in c.modules]
            pairs = [composed[i].modules[name] for i in index]
            rank = max(a.shape[0] for a, _ in pairs)
            a_t = torch.stack([_padded_rank(a, rank, dim=0).t() for a, _ in pairs])
            b_t = torch.stack([_padded_rank(b, rank, dim=1).t() for _, b in pairs])
            rows_index = None if len(index) == len(rows) else torch.tensor(index, device=device)
            entries[name] = (rows_index, a_t.to(device, dtype), b_t.to(device, dtype))
        return cls(entries)


def _padded_rank(matrix: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """`matrix` zero-padded to `rank` along its rank dimension `dim`; as is when already that rank.
    (A batch is rebuilt whenever rows join or leave: a no-op F.pad per row and projection was most
    of a rebuild's cost, 52 -> 17 ms for 32 users.)"""
    short = rank - matrix.shape[dim]
    if short == 0:
        return matrix
    return F.pad(matrix, (0, 0, 0, short) if dim == 0 else (0, short))


_ACTIVE: ContextVar[LoRABatch | None] = ContextVar("steer_lora_batch", default=None)
_HOOKED = "_steer_lora_hooked"


def _install(model: nn.Module, names: Sequence[str]) -> None:
    """Forward hooks on the named projections (once per projection, kept for the model's life)."""
    hooked: set[str] = model.__dict__.setdefault(_HOOKED, set())
    for name in names:
        if name not in hooked:
            model.get_submodule(name).register_forward_hook(_delta_hook(name))
            hooked.add(name)


def _delta_hook(name: str):
    def hook(module, args, output):
        batch = _ACTIVE.get()
        entry = None if batch is None else batch.entries.get(name)
        if entry is None:
            return None
        index, a_t, b_t = entry
        x = args[0]
        if index is None:
            return output + torch.bmm(torch.bmm(x, a_t), b_t)
        delta = torch.bmm(torch.bmm(x.index_select(0, index), a_t), b_t)
        return output.index_add(0, index, delta)

    return hook


@contextmanager
def active(model: nn.Module, batch: LoRABatch | None) -> Iterator[None]:
    """Forward passes of `model` inside this block add each row's LoRA delta (none for None)."""
    if batch is not None:
        _install(model, list(batch.entries))
    token = _ACTIVE.set(batch)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@dataclass
class LoRAConfig:
    """How one user's LoRA is shaped while it trains."""

    rank: int = 3
    """3: on SmolLM2's q/v projections as many parameters as a 16-token prefix (173k vs 184k), so a
    PT-PEFT user (both) stays under 0.3% of the base model (0.27%); rank 4 would be 0.31%."""
    alpha: float | None = None
    """Scale numerator: the delta is (alpha / rank) * B A. None = 2 * rank (PEFT's common choice)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 2 * self.rank) / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        data = dict(data)
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        return cls(**data)


class LoRAModule(nn.Module):
    """Training form of one user's LoRA: A kaiming-uniform from the user's own generator, B = 0, so
    training starts exactly at the base model (Hu et al.), and starts the same alone or beside others."""

    def __init__(self, shapes: dict[str, tuple[int, int]], config: LoRAConfig, generator: torch.Generator):
        super().__init__()
        self.names = list(shapes)
        self.scale = config.scale
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for in_features, out_features in shapes.values():
            a = torch.empty(config.rank, in_features)
            bound = math.sqrt(6 / ((1 + 5) * in_features))  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
            a.uniform_(-bound, bound, generator=generator)
            self.a.append(nn.Parameter(a))
            self.b.append(nn.Parameter(torch.zeros(out_features, config.rank)))

    def forward(self) -> LoRAWeights:
        return LoRAWeights({n: (a, b * self.scale) for n, a, b in zip(self.names, self.a, self.b)})

    @torch.no_grad()
    def export(self) -> LoRAWeights:
        """The servable form: detached, fp32, on CPU, scale folded into B."""
        return LoRAWeights(
            {n: (a.detach().float().cpu(), b.detach().float().cpu()) for n, (a, b) in self().modules.items()}
        )
