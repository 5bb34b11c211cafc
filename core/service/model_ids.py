"""Model ids of trained prefixes, the `model` field clients pass to the completion API.

Format (OpenAI's `ft:` style): `ft:{base_model_id}:{external_user_id}:v{version}`, e.g.
`ft:smollm2-135m-instruct:alice:v3`. Without the `:v{version}` suffix the id names the user's
*active* version. External user ids may not contain `:` (see `EXTERNAL_ID_PATTERN`), and base
model ids do not, so the id parses unambiguously.

A control prefix's versions are `control:{name}:v{version}` (its external id is `control:{name}`;
core/service/controls.py), and `control:{name}` is its active version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "ft"
# Written with `^...$` for the OpenAPI schema (ECMA regex, where `$` is the end); in Python `$`
# also matches before a trailing newline, so every check here uses `fullmatch`.
EXTERNAL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}$")
CONTROL_PREFIX = "control:"
POPULATION_CONTROL = "population"
"""The reserved control name of the deployment's population prefix (core/service/population.py)."""
POPULATION_COPY_SOURCE = "population:"
"""`Sample.source` of a population sample copied from a user: this prefix, then the user's id."""
CONTROL_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_CONTROL_REF = re.compile(r"^([a-z][a-z0-9_-]{0,63})(?::v([1-9][0-9]{0,8}))?$")
_VERSION = re.compile(r"^v([1-9][0-9]{0,8})$")
MAX_VERSION = 999_999_999
"""The largest version number a model id can name (`v` and at most nine digits)."""


@dataclass(frozen=True)
class ModelRef:
    """What a fine-tuned model id points at. `version` None means "the active version"."""

    base_model_id: str
    external_id: str
    version: int | None = None


def format_model_id(base_model_id: str, external_id: str, version: int | None = None) -> str:
    """The model id of a user's prefix (a given version, or the active one when None)."""
    if ":" in base_model_id or not base_model_id:
        raise ValueError(f"base model id {base_model_id!r} cannot be used in a model id")
    if not EXTERNAL_ID_PATTERN.fullmatch(external_id):
        raise ValueError(f"external user id {external_id!r} cannot be used in a model id")
    model_id = f"{PREFIX}:{base_model_id}:{external_id}"
    return model_id if version is None else f"{model_id}:v{version}"


def subject_model_id(base_model_id: str, external_id: str, version: int | None = None) -> str:
    """The model id of a version of a user's prefix (`ft:...`) or of a control's (`control:...`)."""
    if external_id.startswith(CONTROL_PREFIX):
        return external_id if version is None else f"{external_id}:v{version}"
    return format_model_id(base_model_id, external_id, version)


def parse_control_ref(text: str) -> tuple[str, int | None] | None:
    """`name` or `name:v<N>` as (name, version or None); None if `text` is neither."""
    match = _CONTROL_REF.fullmatch(text)
    return None if match is None else (match.group(1), None if match.group(2) is None else int(match.group(2)))


def parse_model_id(model_id: str) -> ModelRef | None:
    """The `ModelRef` of a fine-tuned model id, or None if `model_id` is not one (a base model)."""
    parts = model_id.split(":")
    if len(parts) not in (3, 4) or parts[0] != PREFIX or not parts[1]:
        return None
    if not EXTERNAL_ID_PATTERN.fullmatch(parts[2]):
        return None
    version = None
    if len(parts) == 4:
        match = _VERSION.fullmatch(parts[3])
        if match is None:
            return None
        version = int(match.group(1))
    return ModelRef(base_model_id=parts[1], external_id=parts[2], version=version)
