"""Issue 28's two CPU levers, measured in one run on this machine (ratios within the run; see
docs/BENCHMARKS.md, "bfloat16 and native GQA on an AVX-512-bf16 CPU"):

1. SDPA's native GQA in prefill (`TRANSFORMERS_SDPA_FORCE_GQA=1`; transformers already packs GQA
   in decode): mixed-batch tokens/s, decode-heavy and prefill-heavy, and greedy agreement.
2. bfloat16 training: one author at the service's recipe, float32 then bfloat16, the bfloat16
   prefix's validation loss rescored by the float32 model (what serves it).

Run: python scripts/measure_precision.py  (SmolLM2 from the model cache; ~8 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import torch

from api.commands.bench_engine import _batched, _prompts, _user_prefixes
from core.config import get_settings
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import load_base_model
from core.engine.sampling import SamplingParams
from core.evaluation.datasets import sotu_paragraphs
from core.service.recipe import user_recipe
from core.tuners.base import UserData
from core.tuners.prefix_training import train_prefixes

FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def tokens_per_s(base, prompts, prefixes, new_tokens: int) -> float:
    started = time.perf_counter()
    return _batched(base, prompts, prefixes, new_tokens) / (time.perf_counter() - started)


def greedy_tokens(base, prompts, prefixes, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(p, params, kv) for p, kv in zip(prompts, prefixes)]
    return [r.token_ids for r in MixedBatchGenerator(base, len(requests)).generate(requests)]


def native_gqa(base, requests: int = 16, new_tokens: int = 48, rounds: int = 3) -> dict:
    prompts, prefixes = _prompts(base, requests), _user_prefixes(base, requests, 16)
    runs: dict[str, list[float]] = {"off": [], "on": [], "off_prefill": [], "on_prefill": []}
    tokens_per_s(base, prompts, prefixes, 4)  # warm-up
    for _ in range(rounds):  # interleaved: the machine's drift hits both alike
        for mode in ("off", "on"):
            os.environ[FORCE_GQA] = "1" if mode == "on" else "0"
            runs[mode].append(tokens_per_s(base, prompts, prefixes, new_tokens))
            runs[f"{mode}_prefill"].append(tokens_per_s(base, prompts, prefixes, 4))
    answers = {}
    for mode in ("off", "on"):
        os.environ[FORCE_GQA] = "1" if mode == "on" else "0"
        answers[mode] = greedy_tokens(base, prompts, prefixes, new_tokens)
    os.environ.pop(FORCE_GQA)
    pairs = list(zip(answers["off"], answers["on"]))
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "tokens_per_s": {mode: median(values) for mode, values in runs.items()},
        "decode_heavy_on_over_off": median(runs["on"]) / median(runs["off"]),
        "prefill_heavy_on_over_off": median(runs["on_prefill"]) / median(runs["off_prefill"]),
        "greedy_rows_identical": sum(a == b for a, b in pairs) / len(pairs),
    }


def bfloat16_training(base, author: str = "Lincoln", samples: int = 50) -> dict:
    texts = sotu_paragraphs(author)[:samples]
    recipe = user_recipe(get_settings())
    out: dict = {"author": author, "samples": len(texts), "steps": recipe.max_steps}
    trained = {}
    for dtype in ("float32", "bfloat16"):
        started = time.monotonic()
        trained[dtype] = train_prefixes(base, [UserData(author, texts)], replace(recipe, compute_dtype=dtype))[0]
        out[dtype] = {"seconds": time.monotonic() - started, "val_loss": trained[dtype].metrics["val_loss"]}
    # A one-step float32 job scores its reference (each trained prefix) on the same validation rows.
    rescore = replace(recipe, compute_dtype="float32", max_steps=1, preservation_weight=0.0)
    for dtype, result in trained.items():
        scored = train_prefixes(base, [UserData(author, texts, reference_kv=result.kv)], rescore)[0]
        out[dtype]["val_loss_rescored_float32"] = scored.metrics["reference_val_loss"]
    out["time_bfloat16_over_float32"] = out["bfloat16"]["seconds"] / out["float32"]["seconds"]
    return out


def main() -> None:
    base = load_base_model("smollm2", device="cpu", dtype="float32", cache_root=get_settings().model_cache_dir)
    flags = open("/proc/cpuinfo").read()
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native_gqa": native_gqa(base),
        "bfloat16_training": bfloat16_training(base),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
