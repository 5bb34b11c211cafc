"""`steer bench cache` (issue 15) runs end to end on the tiny model at a small N and reports every figure
the docs quote, with sane values. Timings are never asserted: only that they exist and are ordered."""

import json
import uuid

import pytest
import torch
from typer.testing import CliRunner

from api.commands.bench import app
from api.commands.bench_store import SCALE, bench_cache
from core.config import get_settings
from core.storage import S3BlobStore
from core.tuners.artifacts import Prefix, save_prefix
from tests.engine_fixtures import tiny  # noqa: F401

USERS = 24
REQUESTS = 4
NEW_TOKENS = 3


def _stored_bytes(base, prefix_len: int) -> int:
    """The real artifact size of one prefix of this model and length."""
    kv = torch.zeros(base.geometry.num_layers, 2, base.geometry.num_kv_heads, prefix_len, base.geometry.head_dim)
    return len(save_prefix(Prefix(kv=kv, base_model_id=base.model_id, base_fingerprint=base.fingerprint)))


def _assert_percentiles(figures: dict, samples: int) -> None:
    assert figures["samples"] == samples
    assert 0 < figures["p50"] <= figures["p99"] <= figures["max"], figures


def _assert_batch(batch: dict, arms: set[str], repeats: int) -> None:
    assert batch["requests"] == REQUESTS and batch["repeats"] == repeats
    # Every arm generated every token it was asked for, in every repeat.
    assert batch["generated_tokens"] == {arm: [REQUESTS * NEW_TOKENS] * repeats for arm in arms}
    for per in ("tokens_per_s", "tokens_per_cpu_s", "submit_ms"):
        assert set(batch[per]) == arms
        for spread in batch[per].values():
            assert len(spread["each"]) == repeats and 0 < spread["min"] <= spread["median"] <= spread["max"]
    cold = {arm.removeprefix("cold_") for arm in arms} - {"warm"}
    for key in ("ratios_by_wall_time", "ratios_by_cpu_time"):
        assert set(batch[key]) == {f"cold_{store}/warm (goal >= 0.8)" for store in cold}
        for store in cold:
            spread = batch[key][f"cold_{store}/warm (goal >= 0.8)"]
            per = "tokens_per_s" if key == "ratios_by_wall_time" else "tokens_per_cpu_s"
            for r, value in enumerate(spread["each"]):  # within each repeat, rounding aside
                expected = batch[per][f"cold_{store}"]["each"][r] / batch[per]["warm"]["each"][r]
                assert value > 0 and abs(value - expected) <= 0.05 * expected, (key, store, r, value, expected)


def test_cache_benchmark_holds_every_user_and_counts_the_cache_bytes_of_real_size_blobs(tiny, tmp_path):
    result = bench_cache(
        tiny, USERS, prefix_len=16, requests=REQUESTS, new_tokens=NEW_TOKENS, repeats=2, work_dir=tmp_path
    )
    assert result["users"] == USERS and result["prefix_len"] == 16 and result["stores"] == ["local"]
    assert result["registry"]["active_versions"] == USERS and result["registry"]["publish_ms_per_prefix"] > 0
    _assert_percentiles(result["registry"]["active_lookup_ms"], USERS)

    memory = result["memory"]
    numel = tiny.geometry.numel(16)
    assert memory["stored_bytes_per_prefix"] == _stored_bytes(tiny, 16)  # the real artifact, header included
    assert memory["stored_bytes_per_prefix"] > memory["kv_bytes_fp16_per_prefix"] == numel * 2
    # The cache holds all of them in their stored fp16, though the model computes in fp32.
    assert memory["resident_prefixes"] == USERS and memory["resident_dtype"] == "float16"
    assert memory["cache_bytes_per_prefix"] == numel * 2 and memory["cache_bytes"] == USERS * numel * 2
    assert result["cache_budget_bytes"] == USERS * numel * 2  # the default budget: every user fits, exactly
    assert memory["resident_on"].startswith("cpu")
    assert memory["rss_growth_bytes_per_prefix"] is not None and memory["device_allocated_bytes_per_prefix"] is None
    extrapolated = memory[f"gib_at_{SCALE}"]
    assert extrapolated["cache"] == round(numel * 2 * SCALE / 2**30, 3)
    assert extrapolated["fp16"] == round(numel * 2 * SCALE / 2**30, 3)
    assert memory["prefixes_in_8_gib"]["fp16"] == 8 * 2**30 // (numel * 2)

    _assert_percentiles(result["cache_hit_us"], USERS)
    assert set(result["cold_attach_ms"]) == {"local"}
    _assert_percentiles(result["cold_attach_ms"]["local"], USERS)
    _assert_batch(result["cold_batch"], {"warm", "cold_local"}, repeats=2)
    assert set(result["goals"]) >= {
        f"{SCALE} resident in <= 8 GiB (fp16)",
        f"{SCALE} resident in <= 8 GiB (as cached here)",
        "cold attach p99 <= 50 ms",
        "cold batch >= 0.8 x warm (median)",
    }
    assert not list(tmp_path.iterdir())  # the registry and the local blobs were temporary


def test_cache_benchmark_with_a_small_budget_keeps_only_what_fits(tiny, tmp_path):
    per_prefix = tiny.geometry.numel(2) * 2  # fp16, as resident
    result = bench_cache(
        tiny, 8, prefix_len=2, requests=2, new_tokens=2, repeats=1, cache_bytes=5 * per_prefix, work_dir=tmp_path
    )
    # LRU by bytes: the last 5 loaded stay, hits are timed on those only; every user still attached cold.
    assert result["memory"]["resident_prefixes"] == 5 and result["memory"]["cache_bytes"] == 5 * per_prefix
    assert result["cache_hit_us"]["samples"] == 5 and result["cold_attach_ms"]["local"]["samples"] == 8


@pytest.mark.integration
def test_cache_benchmark_attaches_cold_from_s3_and_removes_its_objects(tiny, tmp_path, s3_server):
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3 = S3BlobStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
    result = bench_cache(
        tiny,
        USERS,
        prefix_len=16,
        stores=("local", "s3"),
        s3=s3,
        requests=REQUESTS,
        new_tokens=NEW_TOKENS,
        repeats=1,
        work_dir=tmp_path,
    )
    assert result["stores"] == ["local", "s3"] and result["copy_ms_per_prefix"]["s3"] > 0
    for store in ("local", "s3"):
        _assert_percentiles(result["cold_attach_ms"][store], USERS)
    _assert_batch(result["cold_batch"], {"warm", "cold_local", "cold_s3"}, repeats=1)
    assert set(result["goals"]["cold attach p99 <= 50 ms"]) == {"local", "s3"}
    assert set(result["goals"]["cold batch >= 0.8 x warm (median)"]) == {"local", "s3"}
    assert s3.list() == []  # the benchmark's objects are gone from the bucket


@pytest.mark.integration
def test_cache_benchmark_can_publish_into_s3_alone(tiny, tmp_path, s3_server):
    s3 = S3BlobStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, f"t-{uuid.uuid4().hex[:16]}")
    result = bench_cache(tiny, 4, prefix_len=2, stores=("s3",), s3=s3, requests=2, new_tokens=2, repeats=1)
    assert result["registry"]["active_versions"] == 4 and set(result["cold_attach_ms"]) == {"s3"}
    assert result["memory"]["resident_prefixes"] == 4 and s3.list() == []


def test_cache_benchmark_needs_as_many_users_as_requests(tiny):
    with pytest.raises(ValueError, match="--users"):
        bench_cache(tiny, 2, prefix_len=2, requests=4)
    with pytest.raises(ValueError, match="s3"):
        bench_cache(tiny, 4, prefix_len=2, stores=("s3",), requests=2)


def test_bench_cache_cli_prints_json(tmp_path):
    args = ["cache", "--base-model", "tiny", "--users", "6", "--prefix-len", "2", "--requests", "2", "--store", "local"]
    args += ["--new-tokens", "2", "--repeats", "1", "--work-dir", str(tmp_path), "--json"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["benchmark"] == "cache" and "torch" in payload["machine"]
    assert payload["users"] == 6 and payload["stores"] == ["local"] and payload["memory"]["resident_prefixes"] == 6
    assert payload["cold_batch"]["generated_tokens"] == {"warm": [4], "cold_local": [4]}


@pytest.mark.integration
def test_bench_cache_cli_reads_the_service_s3_settings(tmp_path, monkeypatch, s3_server):
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    for name, value in s3_server.settings_env().items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()  # the CLI reads the service's settings: STEER_S3_* now, so --store auto is both
    args = ["cache", "--base-model", "tiny", "--users", "4", "--prefix-len", "2", "--requests", "2"]
    args += ["--new-tokens", "2", "--repeats", "1", "--s3-bucket", bucket, "--work-dir", str(tmp_path), "--json"]
    try:
        out = CliRunner().invoke(app, args)
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["stores"] == ["local", "s3"] and set(payload["cold_attach_ms"]) == {"local", "s3"}
