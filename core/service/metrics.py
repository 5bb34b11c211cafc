"""Prometheus metrics recorded by the domain code itself (the API adds its own collectors).

The histogram is created unregistered: the API process and each worker register it in their own
registry, so building several apps in one process (tests) never double-registers.
"""

from __future__ import annotations

from prometheus_client import Histogram

TRAIN_STEP_SECONDS = Histogram(
    "steer_training_step_seconds",
    "Wall-clock seconds of one shared training step (all users of a job together).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
