"""Fixtures for the front-end tests: the default tokenizer and a tiny model directory."""

from __future__ import annotations

import os
import sys

import pytest

# `tests.helpers` resolves from the repository root whether pytest runs as `python -m pytest`
# (which puts the working directory on sys.path) or as the `pytest` script.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from shoal.processing.tokenizer import Tokenizer  # noqa: E402
from tests.helpers import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def default_tokenizer() -> Tokenizer:
    """The default model's tokenizer, built from its GGUF file."""
    return Tokenizer.from_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama config plus the default tokenizer; load it with load_format="dummy"."""
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))
