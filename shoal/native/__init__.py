"""shoal's native CPU kernels (one source per kernel family: `variants.SOURCES`), compiled when
shoal is installed.

`setup.py` builds one extension module per instruction-set level of `variants.py`
(`_kernels_avx2`, `_kernels_avx512`, `_kernels_avx512bf16`); `load()` imports the best one this
CPU runs (or the one SHOAL_NATIVE_ISA names). Nothing is compiled, and nothing is locked,
while shoal runs: loading is an import, a few milliseconds, done by an engine before it
reports ready (`shoal.worker.model_runner`), never inside a request.

`load()` returns None when the kernels cannot be had here (no AVX2/FMA, not built at install,
built from other sources or against another torch, `SHOAL_NATIVE=0`); `unavailable_reason()`
then says why, and one log line at start-up says it too. The module's `vnni` and `bf16`
attributes say which instructions it uses; `load_variant(name)` imports a given level (tests
compare the levels bit for bit). Both hand the module out typed as `api.NativeKernels`, so
mypy checks every kernel call against the bindings' signatures. `python -m shoal.native` reports what is installed, and
`python -m shoal.native build` recompiles a source checkout in place after a kernel edit.

One user: the model's ops table (`shoal.model.ops`), chosen once per process. Through it,
`--quantization int8` (`shoal.model.int8.Int8Linear`) and `--quantization gguf`
(`shoal.model.gguf_quant.Q4Linear`) need the kernels; decode attention, the elementwise ops,
the fused decode path and the greedy LM head use them on float32 CPU tensors when present and
fall back to torch ops otherwise. Only engine processes load the kernels (that imports torch).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import cast

from shoal import envs
from shoal.logger import init_logger
from shoal.native.api import NativeKernels
from shoal.native.variants import BY_NAME, VARIANTS, Variant, pick, source_hash

logger = init_logger(__name__)

REBUILD_HINT = (
    "reinstall shoal with a C++ compiler present (scripts/bootstrap.sh, or "
    "`pip install --no-build-isolation -e .`), or run `python -m shoal.native build` in a "
    "source checkout"
)
_lock = threading.Lock()
_module: NativeKernels | None = None
_reason: str | None = None
_tried = False


def cpu_flags() -> set[str]:
    """This CPU's flags as /proc/cpuinfo lists them (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_variant() -> tuple[Variant | None, str | None]:
    """(the level to load, None) or (None, why none can be loaded here)."""
    env = envs.refresh()
    if not env.native:
        return None, "disabled by SHOAL_NATIVE=0"
    if sys.platform != "linux":
        return None, f"native kernels are built on Linux only (this is {sys.platform})"
    flags = cpu_flags()
    if env.native_isa != "auto":
        variant = BY_NAME.get(env.native_isa)
        if variant is None:
            names = ", ".join(["auto", *BY_NAME])
            return None, f"SHOAL_NATIVE_ISA={env.native_isa!r} is not one of {names}"
        if not variant.runs_on(flags):
            missing = sorted(set(variant.cpu_flags) - flags)
            return None, f"SHOAL_NATIVE_ISA={variant.name}: this CPU lacks {', '.join(missing)}"
        return variant, None
    variant = pick(flags)
    if variant is None:
        missing = sorted(set(VARIANTS[-1].cpu_flags) - flags)
        return None, f"this CPU lacks {', '.join(missing)}"
    return variant, None


def load_variant(name: str) -> NativeKernels:
    """Import the installed module of level `name`; ImportError saying why when it is
    missing, stale (other sources or another torch than it was built from), or not loadable."""
    import torch

    variant = BY_NAME[name]
    try:
        module = importlib.import_module(f"shoal.native.{variant.module}")
    except ImportError as e:
        if e.name == f"shoal.native.{variant.module}":
            raise ImportError(
                f"the {name} kernels were not built at install; {REBUILD_HINT}"
            ) from None
        raise ImportError(f"the {name} kernels do not load ({e}); {REBUILD_HINT}") from e
    expected = source_hash(variant, torch.__version__)
    if module.source_hash != expected:
        raise ImportError(
            f"the installed {name} kernels were built from other sources or another torch "
            f"(build {module.source_hash}, this checkout with torch {torch.__version__} is "
            f"{expected}); {REBUILD_HINT}"
        )
    return cast(NativeKernels, module)


def load() -> NativeKernels | None:
    """The kernels for this CPU, or None (with the reason logged once). Thread-safe; tried
    once per process. Never compiles anything."""
    global _module, _reason, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        variant, _reason = choose_variant()
        if variant is not None:
            try:
                _module = load_variant(variant.name)
            except ImportError as e:
                _reason = str(e)
        if _module is None:
            level = logging.INFO if _reason and _reason.startswith("disabled") else logging.WARNING
            logger.log(level, "native kernels not used (torch ops instead): %s", _reason)
        else:
            assert variant is not None
            logger.debug("native kernels loaded: %s (%s)", variant.name, _module.__file__)
        return _module


def loaded_variant() -> str | None:
    """The level `load()` loaded (None if it has not, or could not)."""
    if _module is None:
        return None
    return _module.__name__.rsplit("_kernels_", 1)[-1]


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not run or succeeded)."""
    return _reason
