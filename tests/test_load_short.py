"""A short, bounded run of the HTTP load test (`steer bench load` runs the full 60 s version).

A real `steer serve` process with the tiny model: below capacity nothing fails; above it the
queue answers 429 with Retry-After, never a timeout or a 5xx; the server's memory stays flat.
"""

from __future__ import annotations

import pytest

from api.commands.loadtest import LoadConfig, run_load_test, verdict


@pytest.fixture(scope="module")
def report():
    return run_load_test(LoadConfig(users=100, duration_s=12, below_clients=6, above_clients=48, max_queue=8))


def test_below_capacity_nothing_fails(report):
    below = report["phases"][0]
    assert report["setup"]["users"] == 100 and report["setup"]["errors"] == 0, report["setup"]
    assert below["errors"] == 0 and below["status_429"] == 0, below
    assert all(kind["requests"] > 0 for kind in below["kinds"].values()), below


def test_above_capacity_is_429_not_timeouts_or_5xx(report):
    above = report["phases"][1]
    assert above["status_429"] > 0, above
    assert above["status_5xx"] == 0 and above["timeouts"] == 0 and above["errors"] == 0, (
        above,
        report["server_error_lines"],
    )
    assert above["kinds"]["stream"]["statuses"].get("200", 0) > 0  # it still serves at full load
    assert verdict(report) == []


def test_server_memory_stays_flat(report):
    # From the light load to 8x the clients, after the model and the population are in. Medians of
    # readings every half second: a single reading may catch a training job's transient peak
    # (one such reading at the end of the run once read 1.26x), a leak moves the median.
    below, above = (phase["rss_mib"] for phase in report["phases"])
    assert above["median"] < below["median"] * 1.25, report["phases"]
