"""Every tuning method by name: the one list the settings, job hyperparameters, the artifact format,
the evaluation and the CLI read. Adding a method is a module under core/tuners/ and an entry here.

Pure data, cheap to import (no torch): a method's trainer is named by its import path and loaded
on first use, so reading the settings never loads the engine.

A method *served* by the service is one a job may ask for (`hyperparameters.method`,
`STEER_TRAIN_METHOD_DEFAULT`); the others are the evaluation's recipes and baselines
(core/evaluation/runner.py trains them). A method that *stores* names the parts of its artifact
(core/tuners/artifacts.py): a prefix KV, a LoRA, or both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    served: bool = False
    """A service job may train it."""
    stores: tuple[bool, bool] | None = None
    """(a prefix KV, a LoRA): what its artifacts hold; None: never stored under this name."""
    trainer: str | None = None
    """"module:function" training every user of a job with it, users sharing every pass
    (core/tuners/train.py calls it); None: only the evaluation trains it, in its own way."""
    decoder_only: bool = True
    """Refused on an encoder-decoder base model."""

    def train_function(self) -> Callable:
        if self.trainer is None:
            raise ValueError(f"method {self.name!r} has no trainer of its own (an evaluation recipe)")
        module, _, function = self.trainer.partition(":")
        return getattr(importlib.import_module(module), function)


PREFIX, LORA, PT_PEFT, AUTO = "prefix", "lora", "pt-peft", "auto"
V0, DPO, PROMPT, PEFT_LORA = "v0", "dpo", "prompt", "peft-lora"
POPULATION, MEMORY, POPULATION_MEMORY = "population", "memory", "population-memory"

_ALL = (
    Method(
        PREFIX,
        "prefix tuning: a prefix KV per user (decoders and encoder-decoders)",
        served=True,
        stores=(True, False),
        trainer="core.tuners.prefix_training:train_prefix_adaptations",
        decoder_only=False,
    ),
    Method(
        LORA,
        "a LoRA per user, rows of many users in one pass",
        served=True,
        stores=(False, True),
        trainer="core.tuners.lora:train_loras",
    ),
    Method(
        PT_PEFT,
        "Prefix-Tuned PEFT: a prefix stage, then a LoRA stage with that prefix on every row",
        served=True,
        stores=(True, True),
        trainer="core.tuners.pt_peft:train_pt_peft",
    ),
    Method(
        AUTO,
        "each stored served method on the job's budget; per user, the lowest validation loss",
        served=True,
        trainer="core.tuners.auto:train_auto",
    ),
    Method(V0, "the untrained instant prefix: the model's KV of the user's first tokens"),
    Method(DPO, "a prefix, then preference tuning (DPO) on simulated feedback"),
    Method(POPULATION, "a user's prefix trained and served on top of one prefix shared by all users"),
    Method(MEMORY, "a user's prefix on top of the model's KV of the user's most typical texts"),
    Method(POPULATION_MEMORY, "a user's prefix on top of the population and memory prefixes"),
    Method(PROMPT, "prompt tuning (soft input tokens), a baseline"),
    Method(PEFT_LORA, "PEFT's LoRA, one adapter per forward, a baseline"),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}

SERVED_METHODS = tuple(m.name for m in _ALL if m.served)
"""What a service job may ask for, in the order the settings and errors list them."""
STORED_METHODS = tuple(m.name for m in _ALL if m.stores is not None)
"""What an artifact may hold: `auto` resolves to one of these per user."""
COMPOSED_PREFIX_METHODS = (POPULATION, MEMORY, POPULATION_MEMORY)
"""Evaluation recipes that train a user's prefix on top of frozen prefixes."""


def method(name: str) -> Method:
    """The method called `name`; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
