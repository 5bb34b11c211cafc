"""The benchmark commands run end to end (on the tiny model) and report the figures the docs quote."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from api.commands.bench import app
from api.commands.bench_engine import (
    CONTROL_SETS,
    _control_prefixes,
    bench_composition,
    bench_lora,
    bench_serving,
    bench_training,
)
from tests.engine_fixtures import tiny  # noqa: F401


def test_serving_benchmark_generates_every_token_it_counts(tiny):
    result = bench_serving(tiny, requests=4, new_tokens=3, prefix_len=2, serial_requests=2)
    arms = {"a_mixed_users", "b_same_user", "c_serial_prefix_swap", "d_base_no_prefix", "hf_continuous_batching_base"}
    assert set(result["tokens_per_s"]) >= arms
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert all(v > 0 for v in result["ratios"].values())


def test_composition_benchmark_counts_every_token_and_reports_ratios_within_each_repeat(tiny):
    result = bench_composition(tiny, requests=4, new_tokens=3, prefix_len=2, repeats=2)
    arms = {"user_only", "user_plus_2_controls", "base_no_prefix"}
    # Every arm, composed rows included, generated exactly the tokens asked in every repeat.
    assert result["generated_tokens"] == {arm: [4 * 3, 4 * 3] for arm in arms}
    assert result["prefix_tokens_per_row"] == {"user_only": 2, "user_plus_2_controls": 6, "base_no_prefix": 0}
    assert result["control_sets"] == [list(s) for s in CONTROL_SETS] and len(set(CONTROL_SETS)) > 1
    for arm in arms:
        spread = result["tokens_per_s"][arm]
        assert len(spread["each"]) == 2 and spread["min"] <= spread["median"] <= spread["max"] and spread["min"] > 0
    # The ratios are the per-repeat quotients of the arms' throughputs (rounding aside).
    each = result["tokens_per_s"]
    denominators = {"composed/user_only (goal >= 0.9)": "user_only", "composed/base_no_prefix": "base_no_prefix"}
    for ratio, denominator in denominators.items():
        spread = result["ratios"][ratio]
        assert len(spread["each"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
        for r, value in enumerate(spread["each"]):
            expected = each["user_plus_2_controls"]["each"][r] / each[denominator]["each"][r]
            assert abs(value - expected) <= 0.05 * expected, (ratio, r, value, expected)
    # The same ratio by CPU time (what other processes' load does not inflate).
    cpu = result["tokens_per_cpu_s"]
    for r, value in enumerate(result["ratios"]["composed/user_only by CPU time"]["each"]):
        expected = cpu["user_plus_2_controls"]["each"][r] / cpu["user_only"]["each"][r]
        assert abs(value - expected) <= 0.05 * expected


def test_control_prefixes_have_exactly_the_asked_length(tiny):
    controls = _control_prefixes(tiny, prefix_len=16)
    assert {c for s in CONTROL_SETS for c in s} <= set(controls)
    assert all(kv.shape[3] == 16 for kv in controls.values())


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
        [
            *("serve", "--base-model", "tiny", "--requests", "2", "--new-tokens", "2", "--serial-requests", "1"),
            *("--no-continuous-batching", "--json"),  # the arm that costs seconds: timed in the test above
        ],
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["benchmark"] == "serve" and report["machine"]["torch"] == torch.__version__
    assert "hf_continuous_batching_base" not in report["tokens_per_s"] and report["tokens_per_s"]["a_mixed_users"] > 0


def test_bench_compose_cli_prints_json():
    out = CliRunner().invoke(
        app, ["compose", "--base-model", "tiny", "--requests", "2", "--new-tokens", "2", "--repeats", "1", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert '"benchmark": "compose"' in out.output and '"composed/user_only (goal >= 0.9)"' in out.output


LORA_ARMS = {"a_base", "b_prefix", "c_lora", "d_prefix_lora", "e_mixed"}


def test_lora_benchmark_counts_every_token_and_reports_positive_ratios_within_each_repeat(tiny):
    result = bench_lora(tiny, requests=8, new_tokens=3, rank=2, prefix_len=2, repeats=2)
    # Every arm, LoRA rows included, generated exactly the tokens asked in every repeat.
    assert result["generated_tokens"] == {arm: [8 * 3, 8 * 3] for arm in LORA_ARMS}
    assert result["rows_by_kind"]["c_lora"] == {"lora": 8} and result["rows_by_kind"]["a_base"] == {"base": 8}
    assert result["rows_by_kind"]["e_mixed"] == {"prefix": 3, "lora": 2, "prefix_lora": 2, "base": 1}
    assert result["lora_rank"] == 2 and result["lora_params_per_user"] > 0
    for per in ("tokens_per_cpu_s", "tokens_per_s"):
        for arm in LORA_ARMS:
            spread = result[per][arm]
            assert len(spread["each"]) == 2 and 0 < spread["min"] <= spread["median"] <= spread["max"], (per, arm)
    # Each ratio is, per repeat, the arm's throughput over the base arm's (rounding aside).
    numerators = {
        "lora/base (goal >= 0.85)": "c_lora",
        "prefix/base": "b_prefix",
        "prefix_lora/base": "d_prefix_lora",
        "mixed/base": "e_mixed",
    }
    for key, per in (("ratios_by_cpu_time", "tokens_per_cpu_s"), ("ratios_by_wall_time", "tokens_per_s")):
        assert set(result[key]) == set(numerators)
        for ratio, arm in numerators.items():
            spread = result[key][ratio]
            assert all(math.isfinite(v) and v > 0 for v in spread["each"]), (key, ratio, spread)
            for r, value in enumerate(spread["each"]):
                expected = result[per][arm]["each"][r] / result[per]["a_base"]["each"][r]
                assert abs(value - expected) <= 0.05 * expected, (key, ratio, r, value, expected)


def test_staggered_lora_benchmark_lets_rows_join_and_leave_and_still_counts_every_token(tiny):
    result = bench_lora(tiny, requests=4, new_tokens=4, rank=2, prefix_len=2, repeats=1, staggered=True)
    # 8 users of 2-5 tokens through 4 slots: rows finish at different steps and queued ones take their place.
    assert result["users_per_arm"] == 8 and result["new_tokens_per_request"]["min"] < 4
    assert result["new_tokens_per_request"]["max"] > 4
    total = result["new_tokens_per_request"]["total"]
    assert result["generated_tokens"] == {arm: [total] for arm in LORA_ARMS}
    for key in ("ratios_by_cpu_time", "ratios_by_wall_time"):
        assert all(math.isfinite(s["median"]) and s["median"] > 0 for s in result[key].values()), result[key]


def test_bench_lora_cli_prints_json_without_the_mixed_arm_when_asked():
    threads = torch.get_num_threads()
    try:
        out = CliRunner().invoke(
            app,
            ["lora", "--base-model", "tiny", "--requests", "3", "--new-tokens", "2", "--rank", "2", "--prefix-len", "2"]
            + ["--repeats", "1", "--threads", "1", "--no-mixed", "--json"],
        )
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["benchmark"] == "lora" and payload["torch_threads"] == 1 and "torch" in payload["machine"]
    assert set(payload["generated_tokens"]) == LORA_ARMS - {"e_mixed"}
    ratio = payload["ratios_by_cpu_time"]["lora/base (goal >= 0.85)"]["median"]
    assert math.isfinite(ratio) and ratio > 0


def test_serving_formats_keep_the_float32_reference_and_report_what_each_format_changes(tiny):
    from api.commands.bench_formats import SERVING_FORMATS, bench_formats, serving_variant

    quantized = serving_variant(tiny, "int8_dynamic")
    assert quantized.model is not tiny.model  # a copy: the served float32 model is unchanged
    assert tiny.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert isinstance(quantized.model.model.layers[0].self_attn.q_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert serving_variant(tiny, "bfloat16").dtype == torch.bfloat16 and serving_variant(tiny, "float32") is tiny

    result = bench_formats(tiny, requests=4, new_tokens=5, prefix_len=2, repeats=2, perplexity_texts=2)
    quality = result["quality (vs the float32 engine, same prompts and prefixes, greedy)"]
    assert set(quality) == set(SERVING_FORMATS)
    # The float32 engine is the reference: it agrees with itself everywhere and its perplexity is the base.
    assert quality["float32"]["token_agreement"] == 1.0 and quality["float32"]["identical_rows"] == "4/4"
    assert quality["float32"]["perplexity_delta_vs_float32"] == "+0.00%"
    assert quality["bfloat16"]["weight_mib"] < quality["float32"]["weight_mib"]
    # int8: one byte per linear weight, float32 elsewhere (the tied output layer gets its own int8 copy)
    linears = [m for m in tiny.model.modules() if isinstance(m, torch.nn.Linear)]
    float32_kept = {p.data_ptr(): p.numel() for p in tiny.model.parameters()}
    for m in linears:
        if m is not tiny.model.get_output_embeddings():  # its weight is the input embeddings' (float32)
            del float32_kept[m.weight.data_ptr()]
    expected = 4 * sum(float32_kept.values()) + sum(m.weight.numel() for m in linears)
    assert abs(quality["int8_dynamic"]["weight_mib"] - expected / 2**20) < 0.2, (quality, expected / 2**20)
    for name in SERVING_FORMATS:
        assert 0.0 <= quality[name]["token_agreement"] <= 1.0 and math.isfinite(quality[name]["held_out_perplexity"])
        spread = result["ratios"][f"mixed_users_{name}/hf_generate_batch_float32 (goal >= 1.5)"]
        assert len(spread["each"]) == 2 and spread["min"] > 0
    with pytest.raises(ValueError, match="float32"):
        bench_formats(serving_variant(tiny, "bfloat16"), 2, 2, 2, 1)
