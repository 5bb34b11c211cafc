"""The CUDA-path checks and benchmarks in one run, one JSON report (scripts/gpu-check.sh calls it).

On a GPU the engine runs in bfloat16, where a row's numbers may change with the shapes of the
batch it shares (other GEMM tilings), so equality is checked at bf16 tolerances and greedy-token
agreement is reported rather than required. Every check records its figures; `ok` is false when
one misses its tolerance. Runs on the CPU too (`--device cpu --dtype float32 --base-model tiny`),
which is how it is tested where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.commands.bench_engine import bench_lora, bench_serving, bench_training  # noqa: E402
from core.config import get_settings  # noqa: E402
from core.engine import lora  # noqa: E402
from core.engine.generation import GenerationRequest, MixedBatchGenerator  # noqa: E402
from core.engine.lora import LoRABatch, LoRAWeights, target_modules  # noqa: E402
from core.engine.model import load_base_model  # noqa: E402
from core.engine.prefix import batch_prefixes, forward_with_prefixes, kv_from_text  # noqa: E402
from core.engine.prompts import text_ids  # noqa: E402
from core.engine.sampling import SamplingParams  # noqa: E402
from core.tuners.base import TrainingConfig, UserData  # noqa: E402
from core.tuners.registry import LORA, PT_PEFT
from core.tuners.train import train_adapters  # noqa: E402

PROMPTS = ["The weather today is", "Once upon a time, in a land", "Dear team, a quick note:", "Numbers: one, two,"]
WRITING = {
    "alice": [f"Alice writes about gardens, roses number {i}, and the quiet of early mornings." for i in range(8)],
    "bob": [f"Bob reports quarterly figures: revenue grew {i} percent and costs fell sharply." for i in range(8)],
}


def _random_lora(base, seed: int, rank: int = 3) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = target_modules(base.model)
    modules = {}
    for name, (in_features, out_features) in shapes.items():
        a = torch.randn(rank, in_features, generator=g) * 0.05
        modules[name] = (a, torch.randn(out_features, rank, generator=g) * 0.05)
    return LoRAWeights(modules).to(base.device, base.dtype)


def _rows(base):
    """(prompt, prefix, LoRA) rows: prefix only, LoRA only, both, none."""
    tok = base.tokenizer
    kv = kv_from_text(base, text_ids(tok, "My fellow citizens, the state of our union is strong.")).to(base.device)
    return [
        (text_ids(tok, PROMPTS[0]), kv, None),
        (text_ids(tok, PROMPTS[1]), None, _random_lora(base, 1)),
        (text_ids(tok, PROMPTS[2]), kv[:, :, :, :6], _random_lora(base, 2)),
        (text_ids(tok, PROMPTS[3]), None, None),
    ]


@torch.no_grad()
def _last_logits(base, rows):
    width = max(len(p) for p, _, _ in rows)
    ids = torch.full((len(rows), width), base.tokenizer.pad_token_id, device=base.device)
    mask = torch.zeros_like(ids)
    for i, (p, _, _) in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p, device=base.device)
        mask[i, width - len(p) :] = 1
    cache = batch_prefixes([kv for _, kv, _ in rows], base.geometry, device=base.device, dtype=base.dtype)
    batch = LoRABatch.from_rows([w for _, _, w in rows], device=base.device, dtype=base.dtype)
    with lora.active(base.model, batch):
        return forward_with_prefixes(base, ids, mask, cache, logits_to_keep=1).logits[:, -1].float()


def check_mixed_forward(base, atol: float) -> dict:
    rows = _rows(base)
    mixed = _last_logits(base, rows)
    diffs = [float((mixed[i] - _last_logits(base, [row])[0]).abs().max()) for i, row in enumerate(rows)]
    return {"max_abs_logit_diff": max(diffs), "per_row": diffs, "atol": atol, "ok": max(diffs) <= atol}


def check_mixed_generation(base) -> dict:
    def requests():
        return [
            GenerationRequest(prompt, SamplingParams(24, temperature=0), kv, lora=weights)
            for prompt, kv, weights in _rows(base)
        ]

    mixed = MixedBatchGenerator(base).generate(requests())
    alone = [MixedBatchGenerator(base).generate([r])[0] for r in requests()]
    same = [m.token_ids == a.token_ids for m, a in zip(mixed, alone)]
    # bf16: a row may legitimately diverge late when two tokens are nearly tied; report, do not fail
    first = [_first_difference(m.token_ids, a.token_ids) for m, a in zip(mixed, alone)]
    return {"rows_identical": sum(same), "rows": len(same), "first_divergence": first, "ok": True}


def _first_difference(x: list[int], y: list[int]) -> int | None:
    return next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), None)


def check_training(base, atol: float) -> dict:
    results = {}
    for method in (LORA, PT_PEFT):
        config = TrainingConfig(max_steps=4, batch_size=2, max_seq_len=48, eval_every=2, warmup_steps=1, method=method)
        users = [UserData(u, texts) for u, texts in WRITING.items()]
        joint = train_adapters(base, users, config)
        worst = 0.0
        for user, together in zip(users, joint):
            (alone,) = train_adapters(base, [user], config)
            for name, (a, b) in together.adaptation.lora.modules.items():
                a2, b2 = alone.adaptation.lora.modules[name]
                worst = max(worst, float((a - a2).abs().max()), float((b - b2).abs().max()))
        results[method] = {"max_abs_param_diff": worst, "atol": atol, "ok": worst <= atol}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="gpu-report.json")
    parser.add_argument("--base-model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="small benchmark sizes (a smoke run)")
    parser.add_argument("--checks-only", action="store_true", help="the checks, no benchmarks")
    args = parser.parse_args()
    started = time.monotonic()
    cache = get_settings().model_cache_dir
    base = load_base_model(args.base_model, device=args.device, dtype=args.dtype, cache_root=cache)
    low_precision = base.dtype in (torch.bfloat16, torch.float16)
    report: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if base.device.type == "cuda" else platform.processor() or "cpu",
        },
        "base_model": base.model_id,
        "dtype": str(base.dtype),
        "checks": {},
        "benchmarks": {},
    }
    checks = report["checks"]
    checks["mixed_forward"] = check_mixed_forward(base, atol=0.25 if low_precision else 1e-4)
    checks["mixed_generation"] = check_mixed_generation(base)
    checks["training_multi_user_equals_alone"] = check_training(base, atol=2e-2 if low_precision else 1e-4)
    if not args.checks_only:
        _run_benchmarks(base, report["benchmarks"], args.quick)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["ok"] = all(c["ok"] if "ok" in c else all(v["ok"] for v in c.values()) for c in checks.values())
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"ok": report["ok"], "wall_seconds": report["wall_seconds"], "report": args.out}))
    return 0 if report["ok"] else 1


def _run_benchmarks(base, benches: dict, quick: bool) -> None:
    """`steer bench serve|lora|train` at GPU sizes (small ones with `quick`)."""
    requests, tokens = (8, 8) if quick else (32, 64)
    benches["serve"] = bench_serving(base, requests, tokens, 16, 4 if quick else 8)
    benches["lora"] = bench_lora(base, requests, tokens, 3, 16, 1 if quick else 3)
    steps, users, budget_s = (2, 2, 10.0) if quick else (10, 8, 55.0)
    benches["train"] = bench_training(base, steps, users, 10, budget_s)


if __name__ == "__main__":
    sys.exit(main())
