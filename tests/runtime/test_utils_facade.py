"""shoal.utils: every seed name, under its seed name, without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import shoal.utils
from shoal.runtime import frontend, managers, monitor, procs

# The public names of vllm.v1.utils' API page (docs/api.md maps each to its module).
SEED_NAMES = {
    "APIServerProcessManager",
    "CpuGpuBuffer",
    "RustFrontendProcessManager",
    "_SubprocessWrapper",
    "_shutdown_subprocesses",
    "compute_iteration_details",
    "copy_slice",
    "get_engine_client_zmq_addr",
    "report_usage_stats",
    "run_api_server_worker_proc",
    "shutdown",
    "tensor_data",
    "wait_for_completion_or_failure",
}


def test_every_seed_name_is_exported() -> None:
    assert set(shoal.utils.__all__) >= SEED_NAMES
    assert set(dir(shoal.utils)) >= SEED_NAMES


def test_runtime_names_are_the_runtime_objects() -> None:
    assert shoal.utils.APIServerProcessManager is managers.APIServerProcessManager
    assert shoal.utils.RustFrontendProcessManager is frontend.RustFrontendProcessManager
    assert shoal.utils.shutdown is procs.shutdown
    assert shoal.utils._shutdown_subprocesses is procs._shutdown_subprocesses
    assert shoal.utils._SubprocessWrapper is procs._SubprocessWrapper
    assert shoal.utils.wait_for_completion_or_failure is monitor.wait_for_completion_or_failure


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        shoal.utils.no_such_name  # noqa: B018


def test_import_does_not_import_torch() -> None:
    code = "import sys, shoal.utils; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_lazy_names_resolve_on_first_access() -> None:
    from shoal.core import iteration

    assert shoal.utils.compute_iteration_details is iteration.compute_iteration_details
    assert isinstance(hasattr(shoal.utils, "CoreEngineActorManager"), bool)  # never raises
