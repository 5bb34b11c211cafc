"""The benchmark commands run end to end (on the tiny model) and report the figures the docs quote."""

from typer.testing import CliRunner

from api.commands.bench import app
from core.bench import bench_serving, bench_training
from tests.engine_fixtures import tiny  # noqa: F401


def test_serving_benchmark_generates_every_token_it_counts(tiny):
    result = bench_serving(tiny, requests=4, new_tokens=3, prefix_len=2, serial_requests=2)
    assert set(result["tokens_per_s"]) >= {"a_mixed_users", "b_same_user", "c_serial_prefix_swap", "d_base_no_prefix"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert all(v > 0 for v in result["ratios"].values())


def test_training_benchmark_reports_every_figure_the_docs_quote(tiny):
    result = bench_training(tiny, steps=3, users=2, personalise_samples=8, time_budget_s=1.0)
    for key in (
        "step_seconds_ours",
        "step_seconds_ours_with_preservation",
        "with/without preservation",
        "batched/sequential",
        "personalise_8_samples_seconds (goal <= 60)",
    ):
        assert result[key] > 0, (key, result[key])
    assert isinstance(result["step_seconds_peft"], float), result["step_seconds_peft"]


def test_bench_cli_prints_json_with_machine_info(monkeypatch):
    out = CliRunner().invoke(
        app,
        ["serve", "--base-model", "tiny", "--requests", "2", "--new-tokens", "2", "--serial-requests", "1", "--json"],
    )
    assert out.exit_code == 0, out.output
    assert '"benchmark": "serve"' in out.output and '"torch"' in out.output
