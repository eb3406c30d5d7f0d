"""shoal's native CPU kernels (`kernels.cpp`, `q4.cpp`), compiled for this machine on first use.

`load()` returns the compiled module, or None when it cannot be had here (no AVX2/FMA, no C++
compiler, `SHOAL_NATIVE=0`); `unavailable_reason()` then says why. The build (about 40 s on
2 cores) goes to `SHOAL_NATIVE_CACHE` (default `~/.cache/shoal/native`), under a name that
hashes the sources, the torch version and this CPU's flags, so a changed kernel, torch or
machine rebuilds and an unchanged one loads in well under a second. `scripts/bootstrap.sh`
builds it ahead (`python -m shoal.native`), so neither `shoal serve` nor the tests pay for it.
Processes that build at once wait on torch's lock file in the build directory.

Users: `--quantization int8` (`shoal.model.llama.Int8Linear`) and `--quantization gguf`
(`shoal.model.gguf_quant.Q4Linear`) need it; decode attention
(`shoal.model.attention`) uses it on float32 CPU caches when present and falls back to
torch ops otherwise. Only engine processes import this module (it imports torch).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

from shoal import envs
from shoal.logger import init_logger

logger = init_logger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")  # holds PYBIND11_MODULE
# Compiled into the same extension (kernels.cpp registers their functions).
EXTRA_SOURCES = (Path(__file__).with_name("q4.cpp"),)
# Included by the sources: part of the build hash, not compiled on their own.
HEADERS = (Path(__file__).with_name("shared.h"),)
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")  # f16c: q4.cpp's float16 block scales
_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None
_tried = False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_name() -> str:
    """The extension's module name: changes with the source, torch and the CPU's flags."""
    import torch

    h = hashlib.sha256()
    for source in (*_sources(), *HEADERS):
        h.update(source.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(sorted(_cpu_flags())).encode())
    h.update(sys.version.encode())
    return f"shoal_native_{h.hexdigest()[:16]}"


def _sources() -> list[Path]:
    return [SOURCE, *EXTRA_SOURCES]


def build_dir() -> Path:
    return Path(envs.refresh().native_cache) / build_name()


def _check_machine() -> str | None:
    if not envs.refresh().native:
        return "disabled by SHOAL_NATIVE=0"
    if sys.platform != "linux":
        return f"native kernels are built on Linux only (this is {sys.platform})"
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    name = directory.name
    fresh = not any(directory.glob(f"{name}*.so"))
    if fresh:
        logger.info("building native kernels into %s (first use; about a minute)", directory)
    start = time.monotonic()
    module = load_extension(
        name=name,
        sources=[str(source) for source in _sources()],
        build_directory=str(directory),
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    if fresh:
        logger.info("native kernels built in %.1f s", time.monotonic() - start)
    return module


def load() -> ModuleType | None:
    """The compiled kernels, building them if needed; None (and a logged reason, once) when
    they cannot be built or loaded here. Thread-safe; tried once per process."""
    global _module, _reason, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        _reason = _check_machine()
        if _reason is None:
            try:
                _module = _build()
            except Exception as e:  # a missing compiler, a failed build: fall back
                _reason = f"build failed: {type(e).__name__}: {str(e).strip()[-500:]}"
        if _module is None:
            logger.info("native kernels not used: %s", _reason)
        return _module


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not run or succeeded)."""
    return _reason
