"""The `steer` command line. Heavy imports happen inside the commands, so `steer --help` is fast."""

from __future__ import annotations

import os
from typing import Annotated

import typer

app = typer.Typer(help="Steer: per-user prefix-tuned personalization of a frozen LM.", no_args_is_help=True)
worker_app = typer.Typer(help="Background workers of the distributed mode.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")


def _settings():
    from core.config import get_settings

    return get_settings()


@app.command()
def migrate() -> None:
    """Bring the database (STEER_DATABASE_URL, or the embedded SQLite file) to the newest schema."""
    from core.db.migrate import upgrade_to_head

    settings = _settings()
    upgrade_to_head(settings.effective_database_url)
    typer.echo(f"database is at the newest schema: {_safe_url(settings.effective_database_url)}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="API processes (distributed mode only).")] = 1,
) -> None:
    """Run the HTTP API (runs the migrations first). Without STEER_REDIS_URL this is the whole
    service in one process: SQLite, local blobs, in-process training and inference."""
    import uvicorn

    from core.db.migrate import upgrade_to_head
    from core.service.admin_key import admin_key_file, ensure_embedded_admin_key

    settings = _settings()
    upgrade_to_head(settings.effective_database_url)
    if settings.mode == "embedded":
        if workers != 1:
            raise typer.BadParameter("embedded mode runs one process (training runs inside it)", param_hint="--workers")
        key = ensure_embedded_admin_key(settings)
        if key is not None:
            typer.secho(
                f"Admin key (shown once; only its hash is kept in {admin_key_file(settings)}):\n  {key}",
                fg=typer.colors.YELLOW,
            )
    elif settings.admin_key is None:
        typer.secho("STEER_ADMIN_KEY is not set: admin endpoints are disabled", fg=typer.colors.RED, err=True)
    typer.echo(
        f"Steer ({settings.mode} mode, base model {settings.base_model}, data in {settings.data_dir}) "
        f"listening on http://{host}:{port}  (API docs: http://{host}:{port}/docs)"
    )
    from api.access_log import uvicorn_log_config

    # Access lines with any key a client put in the query string redacted (api/access_log.py).
    log_options = {"log_level": "info", "log_config": uvicorn_log_config()}
    if workers == 1:
        from api.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, **log_options)
    else:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers, **log_options)


@app.command("admin-key")
def admin_key(
    reset: Annotated[bool, typer.Option("--reset", help="Replace the stored embedded admin key.")] = False,
) -> None:
    """Embedded mode: print a new admin key if none is stored (or with --reset, replace it)."""
    from core.service.admin_key import admin_key_file, ensure_embedded_admin_key

    settings = _settings()
    if settings.admin_key is not None:
        typer.echo("STEER_ADMIN_KEY is set; that is the admin key")
        return
    key = ensure_embedded_admin_key(settings, reset=reset)
    if key is None:
        typer.echo(f"an admin key is already stored ({admin_key_file(settings)}); use --reset to replace it")
        raise typer.Exit(1)
    typer.echo(key)


@worker_app.command("train")
def worker_train(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    metrics_port: Annotated[int | None, typer.Option(help="Serve training metrics on this port.")] = None,
) -> None:
    """A Celery training worker on queue `train`, one job at a time (run one per GPU)."""
    if metrics_port is not None:
        # Before the settings are read: the pool processes, which train, read it from them.
        os.environ["STEER_WORKER_METRICS_PORT"] = str(metrics_port)
    settings = _settings()
    if settings.mode != "distributed":
        raise typer.BadParameter("set STEER_REDIS_URL: training workers are for the distributed mode")
    from workers.celery_app import app as celery_app

    celery_app.worker_main(["worker", "--queues", "train", "--concurrency", "1", "--loglevel", loglevel])


@worker_app.command("infer")
def worker_infer() -> None:
    """An inference worker: serves completions for the API over Redis (distributed mode)."""
    from workers.infer import main

    main()


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASSTHROUGH)
def eval(ctx: typer.Context) -> None:  # noqa: A001 - the command is called `eval`
    """Evaluate personalization quality (see `steer eval --help`)."""
    from api.commands.evaluate import app as evaluation

    _delegate(evaluation, ctx.args, "steer eval")


@app.command("eval-controls", context_settings=_PASSTHROUGH)
def eval_controls(ctx: typer.Context) -> None:
    """Evaluate control prefixes composed with users' prefixes (see `steer eval-controls --help`)."""
    from api.commands.evaluate_controls import app as control_evaluation

    _delegate(control_evaluation, ctx.args, "steer eval-controls")


@app.command(context_settings=_PASSTHROUGH)
def bench(ctx: typer.Context) -> None:
    """Benchmarks of the engine (see `steer bench --help`)."""
    from api.commands.bench import app as bench_app

    _delegate(bench_app, ctx.args, "steer bench")


def _delegate(sub_app: typer.Typer, args: list[str], prog_name: str) -> None:
    """Run another module's Typer app with the remaining arguments, as if it were a subcommand."""
    from typer.main import get_command

    get_command(sub_app).main(args=args, prog_name=prog_name)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    app()
