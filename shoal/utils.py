"""The seed API (vLLM's `vllm.v1.utils`) under its seed names, re-exported from where each lives.

Importing this module never imports torch: names defined in torch-using modules are loaded
on first access (module `__getattr__`). docs/api.md maps every name to its module.
"""

from __future__ import annotations

import importlib
from typing import Any

from shoal.constant_list import ConstantList
from shoal.runtime.addresses import get_engine_client_zmq_addr
from shoal.runtime.frontend import RustFrontendProcessManager
from shoal.runtime.managers import APIServerProcessManager
from shoal.runtime.monitor import wait_for_completion_or_failure
from shoal.runtime.procs import _shutdown_subprocesses, _SubprocessWrapper, shutdown

# ---- Names defined by other parts of shoal: loaded lazily (first access) -------------------
# name -> defining module. Add a name here, not an import above, if its module imports torch
# or anything heavy.
_LAZY: dict[str, str] = {
    "CpuGpuBuffer": "shoal.worker.buffers",
    "copy_slice": "shoal.worker.buffers",
    "tensor_data": "shoal.worker.buffers",
    "IterationDetails": "shoal.core.iteration",
    "compute_iteration_details": "shoal.core.iteration",
    "run_api_server_worker_proc": "shoal.api.server",
    "report_usage_stats": "shoal.engine.usage_stats",
    "CoreEngineProcManager": "shoal.engine.manager",
    "DPCoordinator": "shoal.engine.coordinator",
    "CoreEngineActorManager": "shoal.engine.ray_engines",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'shoal.utils' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module_name), name)
    except ImportError as e:  # e.g. the optional Ray engines: hasattr() must stay False
        raise AttributeError(f"shoal.utils.{name} is unavailable: {e}") from e
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "APIServerProcessManager",
    "ConstantList",
    "RustFrontendProcessManager",
    "_SubprocessWrapper",
    "_shutdown_subprocesses",
    "get_engine_client_zmq_addr",
    "shutdown",
    "wait_for_completion_or_failure",
    # CoreEngineActorManager is left out: its module is optional (Ray), and a star import
    # must not fail without it.
    *(name for name in _LAZY if name != "CoreEngineActorManager"),
]
