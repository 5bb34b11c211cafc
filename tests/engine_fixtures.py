"""Shared engine fixtures: the base models are loaded once per test session."""

import pytest

from core.model import load_base_model
from tests.support.models import model_cache_dir


@pytest.fixture(scope="session")
def tiny():
    """A ~3M-parameter random Llama with GQA and the real SmolLM2 tokenizer."""
    return load_base_model("tiny", device="cpu", dtype="float32", cache_root=model_cache_dir())


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (slow tests only)."""
    return load_base_model("smollm2", device="cpu", dtype="float32", cache_root=model_cache_dir())
