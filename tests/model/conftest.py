"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from shoal import native


@pytest.fixture(scope="module")
def kernels():
    """shoal's compiled native kernels; a test needing them fails (not skips) without them:
    every machine this project runs on can build them."""
    module = native.load()
    if module is None:
        pytest.fail(f"native kernels unavailable: {native.unavailable_reason()}")
    return module
