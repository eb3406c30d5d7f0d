"""Fixtures of the scale-out tests: one real two-node Ray cluster per module, the tiny model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import make_tiny_model_dir
from tests.scale_out.ray_cluster import RayCluster


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head node and a second node (resource "node2"), 1 CPU each, on 127.0.0.1; killed by
    process group at the end of the module, with everything they started."""
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()
