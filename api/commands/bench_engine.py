"""The engine's performance figures, as ratios measured within one run (`steer bench
serve|compose|lora|train`, api/commands/bench.py, prints them).

Timings on a shared CPU are noisy, so every figure is compared with a reference measured in the
same process, minutes apart at most; absolute numbers are printed for context only.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, replace

import torch

from core.engine.batch_cache import prefix_length
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.lora import DEFAULT_TARGETS, LoRAWeights, target_modules
from core.engine.model import BaseModel
from core.engine.prefix import PrefixConfig, kv_from_text
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.tuners.base import TrainingConfig, UserData
from core.tuners.prefix_training import train_prefixes

TOPICS = [
    "the harvest",
    "the railways",
    "the navy",
    "public schools",
    "the currency",
    "foreign trade",
    "the post office",
    "the census",
    "veterans",
    "the frontier",
    "tariffs",
    "the courts",
    "immigration",
    "public lands",
    "the army",
    "canals",
    "the treasury",
    "agriculture",
    "science",
    "the mail",
    "taxes",
    "bridges",
    "the ports",
    "the weather",
    "medicine",
    "music",
    "the budget",
    "libraries",
    "the police",
    "the coast",
    "newspapers",
    "the telegraph",
]


def machine_info() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _user_prefixes(base: BaseModel, n: int, prefix_len: int) -> list[torch.Tensor]:
    """n distinct, realistic prefixes: the model's own KV for n different pieces of text."""
    texts = [f"Writing about {topic}, I always say what I think plainly and at length." for topic in TOPICS]
    return [kv_from_text(base, text_ids(base.tokenizer, texts[i % len(texts)])[:prefix_len]) for i in range(n)]


def _prompts(base: BaseModel, n: int) -> list[list[int]]:
    asks = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(n)]
    return [chat_prompt_ids(base.tokenizer, [{"role": "user", "content": a}]) for a in asks]


@dataclass
class _Run:
    tokens: int
    seconds: float
    cpu_seconds: float | None = None
    """CPU time this process spent on the run (all its threads): what other processes' load does not
    inflate, unlike wall time. Meaningful with one torch thread (idle OpenMP threads spin)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds


def _timed(fn) -> _Run:
    started = time.perf_counter()
    tokens = fn()
    return _Run(tokens, time.perf_counter() - started)


def _batched(base, prompts, prefixes, new_tokens, loras=None) -> int:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    loras = loras or [None] * len(prompts)
    requests = [GenerationRequest(p, params, kv, lora=w) for p, kv, w in zip(prompts, prefixes, loras)]
    return sum(r.completion_tokens for r in MixedBatchGenerator(base, len(requests)).generate(requests))


def _serial(base, prompts, prefixes, new_tokens) -> int:
    """One request at a time, the prefix swapped between requests: how a one-adapter server runs."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine = MixedBatchGenerator(base, 1)
    return sum(
        engine.generate([GenerationRequest(p, params, kv)])[0].completion_tokens for p, kv in zip(prompts, prefixes)
    )


@torch.inference_mode()
def _hf_generate(base, prompts, new_tokens) -> int:
    """transformers' own generate() on the base model, left-padded batch: the reference to beat."""
    tok = base.tokenizer
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = base.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    return (out.shape[1] - width) * len(prompts)


def _hf_continuous_batching(base, prompts, new_tokens) -> int:
    """transformers' own continuous-batching manager (paged KV cache) on the base model.

    It has no notion of a per-request prefix, so it can only serve the no-prefix case: this is the
    reference that decides whether owning a small scheduler is worth it."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=base.tokenizer.pad_token_id
    )
    outputs = base.model.generate_batch(inputs=prompts, generation_config=config)
    return sum(len(o.generated_tokens) for o in outputs.values())


def bench_serving(
    base: BaseModel,
    requests: int,
    new_tokens: int,
    prefix_len: int,
    serial_requests: int,
    continuous_batching: bool = True,
) -> dict:
    """`continuous_batching`: also time transformers' continuous-batching manager (it starts with
    seconds of fixed cost, so a short run may leave it out)."""
    prompts = _prompts(base, requests)
    users = _user_prefixes(base, requests, prefix_len)
    _batched(base, prompts[:4], users[:4], 4)  # warm-up
    mixed = _timed(lambda: _batched(base, prompts, users, new_tokens))
    same = _timed(lambda: _batched(base, prompts, [users[0]] * requests, new_tokens))
    no_prefix = _timed(lambda: _batched(base, prompts, [None] * requests, new_tokens))
    serial = _timed(lambda: _serial(base, prompts[:serial_requests], users[:serial_requests], new_tokens))
    hf_batch = _timed(lambda: _hf_generate(base, prompts, new_tokens))
    hf_single = _timed(lambda: sum(_hf_generate(base, [p], new_tokens) for p in prompts[:4]))
    hf_cb = _timed(lambda: _hf_continuous_batching(base, prompts, new_tokens)) if continuous_batching else None
    runs = {
        "a_mixed_users": mixed,
        "b_same_user": same,
        "c_serial_prefix_swap": serial,
        "d_base_no_prefix": no_prefix,
        "hf_generate_batch": hf_batch,
        "hf_generate_single": hf_single,
        **({"hf_continuous_batching_base": hf_cb} if hf_cb else {}),
    }
    ratios = {
        "a/b (goal >= 0.9)": round(mixed.tokens_per_s / same.tokens_per_s, 3),
        "a/c (goal >= 8)": round(mixed.tokens_per_s / serial.tokens_per_s, 2),
        "a/d (goal >= 0.95)": round(mixed.tokens_per_s / no_prefix.tokens_per_s, 3),
        "a/hf_generate_batch": round(mixed.tokens_per_s / hf_batch.tokens_per_s, 3),
        "hf_batch/hf_single": round(hf_batch.tokens_per_s / hf_single.tokens_per_s, 2),
    }
    if hf_cb:
        ratios["d/hf_continuous_batching (both without prefix)"] = round(no_prefix.tokens_per_s / hf_cb.tokens_per_s, 3)
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "prefix_len": prefix_len,
        "tokens_per_s": {k: round(v.tokens_per_s, 1) for k, v in runs.items()},
        "ratios": ratios,
    }


CONTROL_TEXTS = {
    "formal": "Dear Sir or Madam, I write to you formally, with the utmost respect and in complete sentences.",
    "brief": "Short answer. No detail. One line only. Done. Keep it brief, terse and to the point, always.",
    "casual": "hey so yeah, honestly it's kinda cool lol, just chatting here like friends do, no big deal",
    "long": "Let me explain this at great length, covering every detail, every reason and every consequence.",
}
"""Attribute texts whose KV stands in for trained control prefixes (content does not matter for speed)."""

CONTROL_SETS = (("formal", "brief"), ("casual", "long"))
"""Rows alternate between these control sets: controls are shared, but neighbours carry different ones."""


def _control_prefixes(base: BaseModel, prefix_len: int) -> dict[str, torch.Tensor]:
    controls = {}
    for name, text in CONTROL_TEXTS.items():
        ids = text_ids(base.tokenizer, text)
        ids = (ids * (prefix_len // len(ids) + 1))[:prefix_len]  # exactly prefix_len virtual tokens
        controls[name] = kv_from_text(base, ids)
    return controls


def _spread(values: list[float], digits: int) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "each": [round(v, digits) for v in values],
    }


def _step_interleaved(
    base,
    prompts,
    arms: dict[str, list],
    new_tokens: int | list[int],
    loras: dict[str, list] | None = None,
    slots: int | None = None,
) -> dict[str, _Run]:
    """Generate every arm's batch at once, alternating single engine steps between the arms (the
    order rotating each round), each step timed on its own: a burst of load from another process
    lands on every arm alike instead of on whichever whole run it happens to overlap.

    `arms`: each row's prefix per arm; `loras`: each row's LoRA per arm (arms absent: none);
    `new_tokens`: for every row, or each row's own; `slots`: the batch size (default: every row)."""
    lengths = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    engines = {name: MixedBatchGenerator(base, slots or len(prompts)) for name in arms}
    loras = loras or {}
    for name, prefixes in arms.items():
        row_loras = loras.get(name, [None] * len(prompts))
        for prompt, prefix, lora, length in zip(prompts, prefixes, row_loras, lengths):
            params = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True)
            engines[name].submit(GenerationRequest(prompt, params, prefix, lora=lora))
    tokens = dict.fromkeys(arms, 0)
    seconds = dict.fromkeys(arms, 0.0)
    cpu_seconds = dict.fromkeys(arms, 0.0)
    names = list(arms)
    round_ = 0
    while any(engine.has_work for engine in engines.values()):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if engines[name].has_work:
                started, cpu_started = time.perf_counter(), time.process_time()
                done = engines[name].step()
                seconds[name] += time.perf_counter() - started
                cpu_seconds[name] += time.process_time() - cpu_started
                tokens[name] += sum(r.completion_tokens for r in done)
        round_ += 1
    return {name: _Run(tokens[name], seconds[name], cpu_seconds[name]) for name in arms}


def bench_composition(base: BaseModel, requests: int, new_tokens: int, prefix_len: int, repeats: int) -> dict:
    """Serving cost of composed prefixes (issue 12): one batch of `requests` distinct users, timed as
    (i) each row its user prefix alone, (ii) each row its user prefix + 2 shared controls (rows
    alternate between two control sets), (iii) the base model without prefix.

    Each repeat generates the three batches step-interleaved (`_step_interleaved`), and the ratios
    are taken within each repeat: on a shared CPU, load from other work lands on all arms alike."""
    prompts = _prompts(base, requests)
    users = _user_prefixes(base, requests, prefix_len)
    controls = _control_prefixes(base, prefix_len)
    composed = [[u, *(controls[c] for c in CONTROL_SETS[i % len(CONTROL_SETS)])] for i, u in enumerate(users)]
    arms = {
        "user_only": users,
        "user_plus_2_controls": composed,
        "base_no_prefix": [None] * requests,
    }
    _batched(base, prompts[:4], composed[:4], 4)  # warm-up
    runs: dict[str, list[_Run]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in _step_interleaved(base, prompts, arms, new_tokens).items():
            runs[name].append(run)
    composed_runs = runs["user_plus_2_controls"]
    composed_vs_user = [c.tokens_per_s / u.tokens_per_s for c, u in zip(composed_runs, runs["user_only"])]
    composed_vs_base = [c.tokens_per_s / b.tokens_per_s for c, b in zip(composed_runs, runs["base_no_prefix"])]
    composed_vs_user_cpu = [c.tokens_per_cpu_s / u.tokens_per_cpu_s for c, u in zip(composed_runs, runs["user_only"])]
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefix_tokens_per_row": {name: max(map(prefix_length, arm)) for name, arm in arms.items()},
        "control_sets": [list(s) for s in CONTROL_SETS],
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "generated_tokens": {name: [run.tokens for run in arm] for name, arm in runs.items()},
        "tokens_per_s": {name: _spread([run.tokens_per_s for run in arm], 1) for name, arm in runs.items()},
        "tokens_per_cpu_s": {name: _spread([run.tokens_per_cpu_s for run in arm], 1) for name, arm in runs.items()},
        "torch_threads": torch.get_num_threads(),
        "ratios": {
            "composed/user_only (goal >= 0.9)": _spread(composed_vs_user, 3),
            "composed/base_no_prefix": _spread(composed_vs_base, 3),
            "composed/user_only by CPU time": _spread(composed_vs_user_cpu, 3),
        },
    }


def _user_loras(base: BaseModel, n: int, rank: int, targets=DEFAULT_TARGETS) -> list[LoRAWeights]:
    """n distinct random LoRAs (B != 0, unlike a fresh one), one per user, on the model's dtype and
    device. Their values do not matter for speed; they are small so that the text stays readable."""
    shapes = target_modules(base.model, targets)
    loras = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        modules = {
            name: (torch.randn(rank, i, generator=g) * 0.02, torch.randn(o, rank, generator=g) * 0.02)
            for name, (i, o) in shapes.items()
        }
        loras.append(LoRAWeights(modules).to(base.device, base.dtype))
    return loras


LORA_MIX_KINDS = ("prefix", "lora", "prefix_lora")
"""Adapter kinds of the mixed arm's rows, in turn; every `LORA_MIX_BASE_EVERY`-th row is a base row."""
LORA_MIX_BASE_EVERY = 8


def _mixed_kinds(n: int) -> tuple[str, ...]:
    """n rows: one in 8 a base row, the others a third each prefix, LoRA, prefix + LoRA (32: 4/10/9/9)."""
    adapted = iter(LORA_MIX_KINDS * n)
    return tuple("base" if i % LORA_MIX_BASE_EVERY == LORA_MIX_BASE_EVERY - 1 else next(adapted) for i in range(n))


def _staggered_lengths(n: int, new_tokens: int) -> list[int]:
    """n request lengths spread over [new_tokens/2, 3 new_tokens/2) (mean about new_tokens), in an
    order that makes rows finish a step or two apart."""
    low = max(1, new_tokens // 2)
    return [low + (i * 7) % new_tokens for i in range(n)]


def bench_lora(
    base: BaseModel,
    requests: int,
    new_tokens: int,
    rank: int,
    prefix_len: int,
    repeats: int,
    mixed: bool = True,
    staggered: bool = False,
) -> dict:
    """Serving cost of LoRA rows in the mixed batch (issue 16): one batch of `requests` distinct
    users, every row under its own adapter, timed as (a) the base model, (b) each row its own prefix,
    (c) each row its own LoRA (rank `rank` on q_proj and v_proj, the service default), (d) each row
    its own prefix + its own LoRA (PT-PEFT users), and (e) optionally all kinds mixed (`_mixed_kinds`).

    Each repeat generates every arm's batch step-interleaved (`_step_interleaved`), and the ratios
    are taken within each repeat, by CPU time (exact with one torch thread) and by wall time.

    `staggered`: continuous batching as a server sees it: 2 x `requests` users of different lengths
    (`_staggered_lengths`) through `requests` slots, so rows leave and join while others decode
    (without it, every row starts at the first step and ends at the last)."""
    users = 2 * requests if staggered else requests
    lengths = _staggered_lengths(users, new_tokens) if staggered else [new_tokens] * users
    prompts = _prompts(base, users)
    prefixes = _user_prefixes(base, users, prefix_len)
    loras = _user_loras(base, users, rank)
    kinds = {
        "a_base": ("base",) * users,
        "b_prefix": ("prefix",) * users,
        "c_lora": ("lora",) * users,
        "d_prefix_lora": ("prefix_lora",) * users,
    }
    if mixed:
        kinds["e_mixed"] = _mixed_kinds(users)
    arms = {name: [prefixes[i] if "prefix" in k else None for i, k in enumerate(ks)] for name, ks in kinds.items()}
    arm_loras = {name: [loras[i] if "lora" in k else None for i, k in enumerate(ks)] for name, ks in kinds.items()}
    _batched(base, prompts[:4], prefixes[:4], 4, loras[:4])  # warm-up (installs the LoRA hooks)
    runs: dict[str, list[_Run]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in _step_interleaved(base, prompts, arms, lengths, arm_loras, slots=requests).items():
            runs[name].append(run)

    def ratios(numerator: str, per) -> dict:
        return _spread([per(n) / per(b) for n, b in zip(runs[numerator], runs["a_base"])], 3)

    labels = {
        "c_lora": "lora/base (goal >= 0.85)",
        "b_prefix": "prefix/base",
        "d_prefix_lora": "prefix_lora/base",
        "e_mixed": "mixed/base",
    }
    labels = {name: label for name, label in labels.items() if name in arms}
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "staggered": staggered,
        "users_per_arm": users,
        "new_tokens_per_request": {"min": min(lengths), "max": max(lengths), "total": sum(lengths)},
        "repeats": repeats,
        "lora_rank": rank,
        "lora_targets": list(DEFAULT_TARGETS),
        "lora_params_per_user": loras[0].numel() if loras else 0,
        "prefix_tokens_per_row": prefix_len,
        "rows_by_kind": {name: {k: ks.count(k) for k in dict.fromkeys(ks)} for name, ks in kinds.items()},
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "generated_tokens": {name: [run.tokens for run in arm] for name, arm in runs.items()},
        "tokens_per_cpu_s": {name: _spread([run.tokens_per_cpu_s for run in arm], 1) for name, arm in runs.items()},
        "tokens_per_s": {name: _spread([run.tokens_per_s for run in arm], 1) for name, arm in runs.items()},
        "torch_threads": torch.get_num_threads(),
        "ratios_by_cpu_time": {label: ratios(name, lambda r: r.tokens_per_cpu_s) for name, label in labels.items()},
        "ratios_by_wall_time": {label: ratios(name, lambda r: r.tokens_per_s) for name, label in labels.items()},
    }


def _train_step_seconds(base, users, config) -> float:
    """Mean wall time of a shared training step, the first (warm-up) step excluded."""
    marks = []
    train_prefixes(base, users, config, on_progress=lambda p: marks.append(time.perf_counter()))
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return sum(steps) / len(steps)


def _samples(n: int, tag: str) -> list[str]:
    return [
        f"{tag} note {i}: about {TOPICS[i % len(TOPICS)]}, I would say the matter deserves a careful plan, "
        f"a modest budget and patience from everyone involved in {TOPICS[(i * 7) % len(TOPICS)]}."
        for i in range(n)
    ]


def _peft_step_seconds(base: BaseModel, config: TrainingConfig, steps: int) -> float | str:
    """PEFT PrefixTuningConfig(prefix_projection=True): same model, batch, lengths, prefix length."""
    try:
        from peft import PrefixTuningConfig, get_peft_model
    except ImportError:
        return "peft not installed (pip install -e '.[bench]')"
    from core.engine.data import build_examples

    model = get_peft_model(
        base.model,
        PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.prefix.prefix_len,
            prefix_projection=True,
            encoder_hidden_size=config.prefix.hidden_dim,
        ),
    )
    try:
        examples = build_examples(base.tokenizer, _samples(40, "peft"), config.max_seq_len, config.formats)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
        times = []
        for step in range(steps):
            rows = examples[step * config.batch_size : (step + 1) * config.batch_size]
            width = max(len(e.input_ids) for e in rows)
            ids = torch.tensor([e.input_ids + [base.tokenizer.pad_token_id] * (width - len(e.input_ids)) for e in rows])
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in rows])
            mask = (labels != -100).long() | (ids != base.tokenizer.pad_token_id).long()
            started = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
        return sum(times[1:]) / len(times[1:])
    except Exception as exc:  # PEFT's breakages with the cache API are part of what we report
        return f"PEFT failed: {type(exc).__name__}: {exc}"[:300]
    finally:
        # Prefix tuning injects no modules into the base model: only its requires_grad flags change.
        base.model.requires_grad_(False)


def bench_training(base: BaseModel, steps: int, users: int, personalise_samples: int, time_budget_s: float) -> dict:
    # PEFT has no preservation term: the like-for-like step has it off; its cost is reported apart.
    config = TrainingConfig(
        prefix=PrefixConfig(prefix_len=16), max_steps=steps, batch_size=4, eval_every=10**6, preservation_weight=0.0
    )
    ours = _train_step_seconds(base, [UserData("u0", _samples(40, "u0"))], config)
    preserving = _train_step_seconds(
        base, [UserData("u0", _samples(40, "u0"))], replace(config, preservation_weight=0.5)
    )
    peft = _peft_step_seconds(base, config, steps)
    # Compute only: with the preservation term on, each sequential job would also sample its own anchors.
    multi_cfg = replace(config, max_steps=3, batch_size=2)
    group = [UserData(f"u{i}", _samples(20, f"u{i}")) for i in range(users)]
    together = _timed(lambda: train_prefixes(base, group, multi_cfg) and 1).seconds
    sequential = _timed(lambda: [train_prefixes(base, [u], multi_cfg) for u in group] and 1).seconds
    fast = TrainingConfig(time_budget_s=time_budget_s)
    personalise = _timed(lambda: train_prefixes(base, [UserData("p", _samples(personalise_samples, "p"))], fast) and 1)
    return {
        "step_seconds_ours": round(ours, 3),
        "step_seconds_peft": round(peft, 3) if isinstance(peft, float) else peft,
        "ours/peft (goal <= 1.0)": round(ours / peft, 3) if isinstance(peft, float) else None,
        "step_seconds_ours_with_preservation": round(preserving, 3),
        "with/without preservation": round(preserving / ours, 3),
        f"multi_user_{users}_batched_seconds": round(together, 2),
        f"sequential_{users}_jobs_seconds": round(sequential, 2),
        "batched/sequential": round(together / sequential, 3),
        f"personalise_{personalise_samples}_samples_seconds (goal <= 60)": round(personalise.seconds, 1),
        "artifact_bytes/base_bytes (goal <= 0.002)": round(base.geometry.numel(16) * 2 / base.weight_bytes(), 5),
    }
