"""`steer eval-controls`: a typer command over `core.evaluation.controls.run_control_evaluation`
(mounted by api/cli.py)."""

from __future__ import annotations

import typer

from core.config import get_settings
from core.evaluation.controls import RECIPES, ControlEvalSpec, run_control_evaluation
from core.model import load_base_model


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
    user_steps: int = typer.Option(30, "--user-steps"),
    control_steps: int = typer.Option(30, "--control-steps"),
    batch_size: int = typer.Option(2, "--batch-size"),
    max_seq_len: int = typer.Option(96, "--max-seq-len"),
    prefix_len: int = typer.Option(16, "--prefix-len"),
    learning_rate: float = typer.Option(2e-3, "--learning-rate"),
    eval_every: int = typer.Option(10, "--eval-every"),
    control_preservation: float = typer.Option(0.0, "--control-preservation", help="KL-to-base weight of controls"),
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
