"""`steer eval-controls`: a typer command over `core.evaluation.controls.run_control_evaluation`
(mounted by api/cli.py)."""

from __future__ import annotations

import typer

from core.config import get_settings
from core.engine.model import load_base_model
from core.evaluation.controls import RECIPES, ControlEvalSpec, run_control_evaluation
from core.evaluation.runner import service_settings
from core.service.recipe import control_recipe, user_recipe

# Every training option defaults to the service's recipe (core/service/recipe.py).
SERVICE = {"user": user_recipe(service_settings()), "control": control_recipe(service_settings())}


def _service(what: str, kind: str, field: str) -> str:
    value = SERVICE[kind]
    for part in field.split("."):
        value = getattr(value, part)
    return f"{what} (default: the service's, {value})"


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(
    users: str = typer.Option(
        "Jackson,VanBuren,Tyler,Polk,Pierce", "--users", help="served sotu presidents (companions of recipe beside)"
    ),
    unseen_users: str = typer.Option(
        "Buchanan,Fillmore", "--unseen-users", help="evaluated sotu presidents no control trains beside"
    ),
    control_authors: str = typer.Option(
        "Grant,Cleveland,Harrison,McKinley,Roosevelt,Taft",
        "--control-authors",
        help="sotu presidents whose paragraphs make the brief/address/long controls",
    ),
    controls: str = typer.Option("brief,long,address,dialogue", "--controls"),
    recipes: str = typer.Option(",".join(RECIPES), "--recipes", help=f"comma list of {','.join(RECIPES)}"),
    samples_per_user: int = typer.Option(24, "--samples-per-user"),
    test_per_user: int = typer.Option(4, "--test-per-user"),
    samples_per_control: int = typer.Option(24, "--samples-per-control"),
    test_per_control: int = typer.Option(4, "--test-per-control"),
    user_steps: int | None = typer.Option(None, "--user-steps", help=_service("users' steps", "user", "max_steps")),
    control_steps: int | None = typer.Option(
        None, "--control-steps", help=_service("controls' steps", "control", "max_steps")
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help=_service("rows per step", "user", "batch_size")),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help=_service("tokens per row", "user", "max_seq_len")
    ),
    prefix_len: int | None = typer.Option(
        None, "--prefix-len", help=_service("prefix tokens", "user", "prefix.prefix_len")
    ),
    learning_rate: float | None = typer.Option(
        None, "--learning-rate", help=_service("learning rate", "user", "learning_rate")
    ),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help=_service("validation every N steps", "user", "eval_every")
    ),
    control_preservation: float | None = typer.Option(
        None, "--control-preservation", help=_service("KL-to-base weight of controls", "control", "preservation_weight")
    ),
    max_companions: int = typer.Option(8, "--max-companions"),
    prompts: int = typer.Option(6, "--prompts", help="chat prompts answered under every prefix (at most 8)"),
    max_tokens: int = typer.Option(48, "--max-tokens"),
    temperature: float = typer.Option(0.8, "--temperature"),
    base_model: str = typer.Option("smollm2", "--base-model", help="smollm2, tiny, or a model directory"),
    seed: int = typer.Option(0, "--seed"),
    out: str = typer.Option("eval-controls", "--out"),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (1 is 3-4x faster than 2 on a CPU shared with other work)"
    ),
) -> None:
    """Train users' prefixes and control prefixes (per recipe) and report how the controls compose."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    spec = ControlEvalSpec(
        users=_names(users),
        unseen_users=_names(unseen_users),
        control_authors=_names(control_authors),
        controls=_names(controls),
        recipes=_names(recipes),
        samples_per_user=samples_per_user,
        test_per_user=test_per_user,
        samples_per_control=samples_per_control,
        test_per_control=test_per_control,
        user_steps=user_steps,
        control_steps=control_steps,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        prefix_len=prefix_len,
        learning_rate=learning_rate,
        eval_every=eval_every,
        control_preservation=control_preservation,
        max_companions=max_companions,
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=temperature,
        base_model=base_model,
        seed=seed,
        out=out,
    )
    base = load_base_model(spec.base_model, cache_root=get_settings().model_cache_dir)
    results = run_control_evaluation(spec, base, log=typer.echo)
    for recipe, s in results["summary"].items():
        typer.echo(
            f"{recipe:15s} attribute helped {s['attribute_helps']}/{s['cells']}, own within 5% "
            f"{s['own_within_5pct']}/{s['cells']}, generated moved {s['generated_moved']}/{s['cells']}, "
            f"mean ratios attribute {s['mean_attribute_ratio']:.3f} own {s['mean_own_ratio']:.3f}"
        )
    typer.echo(f"report: {out}/report.md")


app = typer.Typer(add_completion=False)
app.command()(run)

if __name__ == "__main__":
    app()
