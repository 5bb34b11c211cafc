"""Serving weight formats (issue 28): the same mixed batch of users served from the float32 weights,
from bfloat16 weights and from int8 dynamically quantized linear layers, against transformers' own
float32 static `generate()` batch, with what each format costs in quality: greedy agreement with the
float32 engine and held-out perplexity (`steer bench formats`).

All arms run in one process, in rotated order, `repeats` times; ratios are taken within a repeat."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import torch

from api.commands.bench_engine import _batched, _hf_generate, _prompts, _Run, _spread, _timed, _user_prefixes
from core.engine.data import Example
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import BaseModel
from core.engine.prompts import text_ids
from core.engine.sampling import SamplingParams
from core.evaluation.metrics import PrefixScorer, ppl, score_rows

SERVING_FORMATS = ("float32", "bfloat16", "int8_dynamic")


def serving_variant(base: BaseModel, name: str) -> BaseModel:
    """The float32 base model served in another weight format (a copy; `base` is unchanged).

    int8_dynamic: every nn.Linear's weight stored in int8 (per-tensor scale), activations quantized
    per batch at run time, float32 everywhere else (embeddings, norms, attention): torch's
    `quantize_dynamic`, the CPU path that needs no calibration data."""
    if name == "float32":
        return base
    model = copy.deepcopy(base.model)
    if name == "bfloat16":
        model.to(torch.bfloat16)
    elif name == "int8_dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        raise ValueError(f"unknown serving format {name!r}; one of {', '.join(SERVING_FORMATS)}")
    model.eval()
    return replace(base, model=model)


def _greedy_tokens(base: BaseModel, prompts, prefixes, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(p, params, kv) for p, kv in zip(prompts, prefixes)]
    return [list(r.token_ids) for r in MixedBatchGenerator(base, len(requests)).generate(requests)]


def _agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Token agreement position by position (what greedy agreement usually means), the mean length of
    the common prefix before the first different token, and the rows identical throughout."""
    same = sum(a == b for ref, out in zip(reference, other) for a, b in zip(ref, out))
    total = sum(len(ref) for ref in reference)
    common = []
    for ref, out in zip(reference, other):
        n = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
        common.append(n)
    return {
        "token_agreement": round(same / total, 4),
        "mean_tokens_before_first_difference": round(sum(common) / len(common), 1),
        "identical_rows": f"{sum(r == o for r, o in zip(reference, other))}/{len(reference)}",
    }


def _perplexity(base: BaseModel, texts: list[str], max_tokens: int) -> float:
    """Held-out perplexity of the base model (no prefix) over `texts`, each cut to `max_tokens`,
    scored by the evaluation's own scorer (the engine's forward, every token after the first)."""
    rows = [Example(ids, list(ids)) for ids in (text_ids(base.tokenizer, t)[:max_tokens] for t in texts)]
    sums, counts = score_rows(PrefixScorer(base, {}), rows, [None] * len(rows))
    return ppl(sums.sum().item(), counts.sum().item())


def _held_out_texts(n: int) -> list[str]:
    from core.evaluation.datasets import sotu_paragraphs

    return sotu_paragraphs("Obama")[-n:]


def bench_formats(
    base: BaseModel,
    requests: int,
    new_tokens: int,
    prefix_len: int,
    repeats: int,
    formats: tuple[str, ...] = SERVING_FORMATS,
    perplexity_texts: int = 40,
) -> dict:
    """`base` must be the float32 model: every other format is derived from it."""
    if base.dtype != torch.float32:
        raise ValueError(f"the reference must be the float32 model, got {base.dtype}")
    prompts = _prompts(base, requests)
    users = _user_prefixes(base, requests, prefix_len)
    variants = {name: serving_variant(base, name) for name in formats}
    reference = _greedy_tokens(base, prompts, users, new_tokens)
    quality = {}
    texts = _held_out_texts(perplexity_texts)
    reference_ppl = _perplexity(base, texts, max_tokens=256)
    for name, variant in variants.items():
        ppl = reference_ppl if variant is base else _perplexity(variant, texts, max_tokens=256)
        tokens = reference if variant is base else _greedy_tokens(variant, prompts, users, new_tokens)
        quality[name] = {
            **_agreement(reference, tokens),
            "held_out_perplexity": round(ppl, 3),
            "perplexity_delta_vs_float32": f"{(ppl / reference_ppl - 1) * 100:+.2f}%",
            "weight_mib": round(_weight_bytes(variant.model) / 2**20, 1),
        }

    arms = {f"mixed_users_{name}": (variant, users) for name, variant in variants.items()}
    runs: dict[str, list[_Run]] = {name: [] for name in [*arms, "hf_generate_batch_float32"]}
    for variant, prefixes in arms.values():  # warm-up of every arm
        _greedy_tokens(variant, prompts[:4], prefixes[:4], 4)
    _hf_generate(base, prompts[:4], 4)
    order = list(runs)
    for repeat in range(repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            if name == "hf_generate_batch_float32":
                runs[name].append(_timed(lambda: _hf_generate(base, prompts, new_tokens)))
            else:
                variant, prefixes = arms[name]
                runs[name].append(_timed(lambda v=variant, p=prefixes: _batched(v, prompts, p, new_tokens)))

    hf = runs["hf_generate_batch_float32"]
    float32 = runs.get("mixed_users_float32")
    ratios = {}
    for name in arms:
        ratios[f"{name}/hf_generate_batch_float32 (goal >= 1.5)"] = _spread(
            [r.tokens_per_s / h.tokens_per_s for r, h in zip(runs[name], hf)], 3
        )
        if float32 is not None and name != "mixed_users_float32":
            ratios[f"{name}/mixed_users_float32"] = _spread(
                [r.tokens_per_s / f.tokens_per_s for r, f in zip(runs[name], float32)], 3
            )
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "prefix_len": prefix_len,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "quality (vs the float32 engine, same prompts and prefixes, greedy)": quality,
        "tokens_per_s": {name: _spread([r.tokens_per_s for r in arm], 1) for name, arm in runs.items()},
        "ratios": ratios,
    }


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as stored: tied weights once, packed int8 weights included (they are
    not parameters of a quantized module)."""
    seen, total = set(), 0
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            tensors.extend(t for t in packed._weight_bias() if t is not None)
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.numel()) if not tensor.is_quantized else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
