"""Training hyperparameters a job may ask for, OpenAI-style: each one a value or "auto".

`validate_hyperparameters` runs when a job is created (bad input is refused before anything is
stored); `resolve` turns "auto" into the configured defaults when the job runs, and
`training_config` builds the engine's `TrainingConfig` from the resolved values.

One exception: for `method`, "auto" is a method of its own (train every method, keep the best per
user: core/tuners/registry.py); the service default is asked for by leaving `method` out, or null.
"""

from __future__ import annotations

import math
from typing import Any

from core.config import Settings
from core.engine.lora import LoRAConfig
from core.engine.prefix import INIT_ACTIVATIONS, INIT_RANDOM, PrefixConfig
from core.service.errors import InvalidInput
from core.tuners.base import TrainingConfig
from core.tuners.preference import OBJECTIVE_DPO, OBJECTIVE_SFT, OBJECTIVES
from core.tuners.registry import AUTO as AUTO_METHOD
from core.tuners.registry import SERVED_METHODS

AUTO = "auto"
MAX_SEED = 2**31 - 1
"""The largest training seed (also of the population's draw): within every RNG's range."""
# name -> (type, minimum, maximum); None bounds are open.
_INTS = {
    "prefix_len": (1, 512),
    "max_steps": (1, 100_000),
    "batch_size": (1, 256),
    "seed": (0, MAX_SEED),
    "lora_rank": (1, 64),
}
_FLOATS = {
    "n_epochs": (0.0, 1000.0),
    "learning_rate": (0.0, 1.0),
    "learning_rate_multiplier": (0.0, 100.0),
    "preservation_weight": (0.0, 100.0),
    "beta": (0.0, 100.0),
}
_ZERO_ALLOWED = {"preservation_weight"}  # 0 means "off"; the others must be positive
_ALIASES = {"epochs": "n_epochs"}
INITS = (INIT_RANDOM, INIT_ACTIVATIONS)
METHOD = "method"
"""Unset (None): the service default (`STEER_TRAIN_METHOD_DEFAULT`); "auto" is the auto method."""
OBJECTIVE = "objective"
"""What the job optimises: 'sft' (the user's text) or 'dpo' (their preference pairs). Set from
OpenAI's `method={"type": "supervised" | "dpo"}` (`openai_method`)."""
KNOWN = tuple(_INTS) + tuple(_FLOATS) + ("init", METHOD, OBJECTIVE)
OPENAI_METHODS = {"supervised": OBJECTIVE_SFT, "dpo": OBJECTIVE_DPO}


def _unset(name: str) -> Any:
    return None if name == METHOD else AUTO


def validate_hyperparameters(raw: object) -> dict[str, Any]:
    """The normalized hyperparameters of a request (every known name present, "auto" default)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidInput("hyperparameters must be an object", param="hyperparameters")
    values: dict[str, Any] = {name: _unset(name) for name in KNOWN}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        param = f"hyperparameters.{key}"
        if name not in KNOWN:
            raise InvalidInput(
                f"unknown hyperparameter {key!r}; known: {', '.join(sorted(KNOWN + tuple(_ALIASES)))}",
                param=param,
            )
        if name == METHOD:
            if value is not None and value not in SERVED_METHODS:
                raise InvalidInput(
                    f"method must be one of {', '.join(SERVED_METHODS)} (auto: train each, keep the best per user), "
                    "or null for the service default",
                    param=param,
                )
            values[name] = value
            continue
        if value is None or value == AUTO:
            continue
        if name == OBJECTIVE:
            if value not in OBJECTIVES:
                raise InvalidInput(f"objective must be one of {', '.join(OBJECTIVES)}", param=param)
        elif name in _INTS:
            low, high = _INTS[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidInput(f'{key} must be "auto" or an integer in [{low}, {high}]', param=param)
        elif name in _FLOATS:
            low, high = _FLOATS[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            above_low = ok and (low <= value if name in _ZERO_ALLOWED else low < value)
            if not ok or not (above_low and value <= high):
                bracket = "[" if name in _ZERO_ALLOWED else "("
                raise InvalidInput(f'{key} must be "auto" or a number in {bracket}{low}, {high}]', param=param)
            value = float(value)
        elif value not in INITS:
            raise InvalidInput(f'init must be "auto" or one of {", ".join(INITS)}', param=param)
        values[name] = value
    if values["beta"] != AUTO and values[OBJECTIVE] != OBJECTIVE_DPO:
        raise InvalidInput('beta is a hyperparameter of method {"type": "dpo"}', param="hyperparameters.beta")
    if values["learning_rate"] != AUTO and values["learning_rate_multiplier"] != AUTO:
        raise InvalidInput(
            "give learning_rate or learning_rate_multiplier, not both",
            param="hyperparameters.learning_rate_multiplier",
        )
    return values


def resolve(values: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Replace every "auto" with the configured default (what the job actually uses)."""
    values = {**{name: _unset(name) for name in KNOWN}, **values}
    multiplier = values["learning_rate_multiplier"]
    multiplier = 1.0 if multiplier == AUTO else multiplier
    learning_rate = values["learning_rate"]
    if learning_rate == AUTO:
        learning_rate = _or_engine(settings.train_learning_rate_default, "learning_rate") * multiplier
    defaults = {
        "prefix_len": settings.train_prefix_len_default or ENGINE_DEFAULTS.prefix.prefix_len,
        "max_steps": _or_engine(settings.train_max_steps_default, "max_steps"),
        "batch_size": _or_engine(settings.train_batch_size_default, "batch_size"),
        "seed": 0,
        "n_epochs": None,  # no epoch bound: max_steps (and early stopping) decide
        "init": INIT_ACTIVATIONS,
        "preservation_weight": _or_engine(settings.train_preservation_weight_default, "preservation_weight"),
        "lora_rank": settings.train_lora_rank_default,
        OBJECTIVE: OBJECTIVE_SFT,
        "beta": ENGINE_DEFAULTS.dpo_beta,
    }
    resolved = {name: (defaults[name] if values[name] == AUTO else values[name]) for name in defaults}
    resolved[METHOD] = values[METHOD] or settings.train_method_default
    resolved["learning_rate"] = learning_rate
    resolved["learning_rate_multiplier"] = multiplier
    # prefix_len left on auto: search the configured candidates (if any) per user.
    if "prefix_len_candidates" in values:  # already resolved by an earlier attempt of this job
        resolved["prefix_len_candidates"] = list(values["prefix_len_candidates"])
    else:
        search = values["prefix_len"] == AUTO and len(settings.train_prefix_len_candidates) > 1
        resolved["prefix_len_candidates"] = list(settings.train_prefix_len_candidates) if search else []
    return resolved


ENGINE_DEFAULTS = TrainingConfig()


def _or_engine(configured: Any, name: str) -> Any:
    """An operator's setting, or the engine's own default when the setting is unset."""
    return getattr(ENGINE_DEFAULTS, name) if configured is None else configured


def training_config(resolved: dict[str, Any], settings: Settings) -> TrainingConfig:
    """The engine config for resolved hyperparameters."""
    max_steps = resolved["max_steps"]
    method = resolved.get(METHOD) or settings.train_method_default
    # The auto method trains every method in turn: each gets its share of the time limit.
    time_share = 1 / 3 if method == AUTO_METHOD else 1.0
    return TrainingConfig(
        prefix=PrefixConfig(prefix_len=resolved["prefix_len"], init=resolved["init"]),
        learning_rate=resolved["learning_rate"],
        max_steps=max_steps,
        epochs=resolved["n_epochs"],
        batch_size=resolved["batch_size"],
        max_seq_len=_or_engine(settings.train_max_seq_len, "max_seq_len"),
        prefix_len_candidates=tuple(resolved.get("prefix_len_candidates") or ()),
        warmup_steps=min(10, max(0, max_steps // 10)),
        seed=resolved["seed"],
        preservation_weight=resolved.get("preservation_weight", 0.0),
        # Stop training (keeping the best checkpoint) before the hard task time limit hits.
        time_budget_s=settings.train_time_limit_s * 0.9 * time_share,
        method=method,
        lora=LoRAConfig(rank=resolved.get("lora_rank") or settings.train_lora_rank_default),
        users_per_pass=settings.train_users_per_pass,
        compute_dtype=settings.train_compute_dtype,
        chat_requests=settings.train_chat_requests,
        preservation_prompts=settings.train_preservation_prompts,
        objective=resolved.get(OBJECTIVE, OBJECTIVE_SFT),
        dpo_beta=resolved.get("beta", ENGINE_DEFAULTS.dpo_beta),
    )


def openai_method(method: object, hyperparameters: object) -> dict[str, Any] | None:
    """OpenAI's `method` object (`{"type": "supervised" | "dpo", "<type>": {"hyperparameters": {...}}}`)
    folded into the job's raw hyperparameters (`objective` set); a name given both ways must agree."""
    if method is None:
        return hyperparameters  # type: ignore[return-value]  # validated next, as it is
    if not isinstance(method, dict) or method.get("type") not in OPENAI_METHODS:
        raise InvalidInput(f"method.type must be one of {', '.join(OPENAI_METHODS)}", param="method.type")
    kind = method["type"]
    unknown = set(method) - {"type", kind}
    if unknown:
        raise InvalidInput(f"method has unknown field(s) {', '.join(sorted(unknown))}", param="method")
    nested = method.get(kind) or {}
    nested = nested.get("hyperparameters") if isinstance(nested, dict) else None
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise InvalidInput(f"method.{kind}.hyperparameters must be an object", param=f"method.{kind}.hyperparameters")
    if hyperparameters is not None and not isinstance(hyperparameters, dict):
        raise InvalidInput("hyperparameters must be an object", param="hyperparameters")
    merged = dict(hyperparameters or {})
    for key, value in nested.items():
        if key in merged and merged[key] != value:
            raise InvalidInput(
                f"hyperparameters.{key} and method.{kind}.hyperparameters.{key} disagree",
                param=f"method.{kind}.hyperparameters.{key}",
            )
        merged[key] = value
    objective = OPENAI_METHODS[kind]
    if merged.get(OBJECTIVE, objective) != objective:
        raise InvalidInput(f"hyperparameters.objective contradicts method.type {kind!r}", param="hyperparameters")
    return {**merged, OBJECTIVE: objective}
