"""The one training recipe: what a job trains, read by the service and by the evaluation harness.

    config = user_recipe(settings, hyperparameters)          # a user's job
    config = control_recipe(settings, hyperparameters)       # a control's job
    population = population_recipe(settings)                 # the population prefix: draw and rows
    config = population.config(settings, users=10)           # ... and its job

The service turns a job's stored hyperparameters into its `TrainingConfig` through these functions
and nothing else; `steer eval` and `steer eval-controls` call the same ones and override only their
data and what they are told to sweep. A figure measured on another recipe says nothing about the
service (tests/test_recipe.py holds the two to one `TrainingConfig`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from core.config import Settings
from core.service.hyperparameters import AUTO, METHOD, resolve, training_config, validate_hyperparameters
from core.tuners.base import TrainingConfig
from core.tuners.registry import PREFIX as PREFIX_METHOD

T = TypeVar("T")

POPULATION_SAMPLES_PER_USER = 20
"""Samples drawn from each user unless the admin asks otherwise."""
POPULATION_MAX_USERS = 256
"""Users drawn (at random) unless the admin asks otherwise."""
POPULATION_MAX_ROWS = 16
"""Most rows of one population training step."""


def user_recipe(settings: Settings, hyperparameters: object = None) -> TrainingConfig:
    """What a user's job trains for these (validated, then resolved) hyperparameters."""
    return training_config(resolve(validate_hyperparameters(hyperparameters), settings), settings)


def control_values(values: dict[str, Any]) -> dict[str, Any]:
    """A control's validated hyperparameters as it trains them: always a prefix, and no preservation
    unless asked (the KL term pulls towards the bare base model; with a user's prefix attached that
    would teach the control to undo the user)."""
    values = {**values, METHOD: PREFIX_METHOD}
    if values.get("preservation_weight", AUTO) == AUTO:
        values["preservation_weight"] = 0.0
    return values


def control_recipe(settings: Settings, hyperparameters: object = None) -> TrainingConfig:
    """What a control's job trains (its method checked by the route that queues it)."""
    return training_config(resolve(control_values(validate_hyperparameters(hyperparameters)), settings), settings)


@dataclass(frozen=True)
class PopulationRecipe:
    """How the deployment's population prefix is drawn and trained: up to `samples_per_user` texts
    of each of up to `max_users` users, every step holding as many rows as the drawn users' own jobs
    would together (their batch size each), at most `POPULATION_MAX_ROWS`."""

    samples_per_user: int
    max_users: int
    rows_per_user: int

    def rows_per_step(self, users: int) -> int:
        return min(POPULATION_MAX_ROWS, self.rows_per_user * max(1, users))

    def values(self, values: dict[str, Any], users: int) -> dict[str, Any]:
        """The population job's validated hyperparameters: a prefix, and the rows of `users` users
        per step unless the admin set a batch size."""
        values = {**values, METHOD: PREFIX_METHOD}
        if values.get("batch_size", AUTO) == AUTO:
            values["batch_size"] = self.rows_per_step(users)
        return values

    def config(self, settings: Settings, users: int, hyperparameters: object = None) -> TrainingConfig:
        """What the population job trains, drawn from `users` users."""
        return training_config(
            resolve(self.values(validate_hyperparameters(hyperparameters), users), settings), settings
        )

    def draw(self, texts: Mapping[str, Sequence[T]], rng: random.Random) -> dict[str, list[T]]:
        """The draw of `texts` (user -> their samples, or sample ids): users, then their samples."""
        return {user: [texts[user][i] for i in self.pick(len(texts[user]), rng)] for user in self.users(texts, rng)}

    def users(self, users: Sequence[str] | Mapping[str, Any], rng: random.Random) -> list[str]:
        """The drawn users, sorted: all of them, or `max_users` at random."""
        users = sorted(users)
        return users if len(users) <= self.max_users else sorted(rng.sample(users, self.max_users))

    def pick(self, count: int, rng: random.Random) -> list[int]:
        """Which of a drawn user's `count` samples (in stored order) go in, in that order."""
        return sorted(rng.sample(range(count), min(self.samples_per_user, count)))


def population_recipe(
    settings: Settings,
    samples_per_user: int = POPULATION_SAMPLES_PER_USER,
    max_users: int = POPULATION_MAX_USERS,
) -> PopulationRecipe:
    return PopulationRecipe(samples_per_user, max_users, rows_per_user=user_recipe(settings).batch_size)
