"""shoal's native CPU kernels (`kernels.cpp`, `q4.cpp`), compiled for this machine on first use.

`load()` returns the compiled module, or None when it cannot be had here (no AVX2/FMA, no C++
compiler, `SHOAL_NATIVE=0`); `unavailable_reason()` then says why. The build (about 40 s on
2 cores) goes to `SHOAL_NATIVE_CACHE` (default `~/.cache/shoal/native`), under a name that
hashes the sources, the torch version, this CPU's flags and the target (`-march`,
`SHOAL_NATIVE_MARCH`, default `native`), so a changed kernel, torch or machine rebuilds and an
unchanged one loads in well under a second. The module's `vnni` attribute says whether its
integer kernels use AVX-512 VNNI (shoal/native/shared.h); `build(march)` compiles another
target beside it (tests compare an AVX2-only build with the native one bit for bit). `scripts/bootstrap.sh`
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
# -ffp-contract=off: no product is fused into an add unless the source says so (an fma
# intrinsic or std::fma). GCC otherwise decides per target and per loop, and a build with
# AVX-512 rounded some scalar tails differently from an AVX2 one.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG")
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


def build_name(march: str | None = None) -> str:
    """The extension's module name: changes with the source, torch, the CPU's flags and the
    target (`march`, default SHOAL_NATIVE_MARCH)."""
    import torch

    march = march or envs.refresh().native_march
    h = hashlib.sha256()
    h.update(" ".join(_CFLAGS).encode())
    if march != "native":  # (keeps the default build's name as it was)
        h.update(f"-march={march}".encode())
    for source in (*_sources(), *HEADERS):
        h.update(source.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(sorted(_cpu_flags())).encode())
    h.update(sys.version.encode())
    return f"shoal_native_{h.hexdigest()[:16]}"


def _sources() -> list[Path]:
    return [SOURCE, *EXTRA_SOURCES]


def build_dir(march: str | None = None) -> Path:
    return Path(envs.refresh().native_cache) / build_name(march)


def _check_machine() -> str | None:
    if not envs.refresh().native:
        return "disabled by SHOAL_NATIVE=0"
    if sys.platform != "linux":
        return f"native kernels are built on Linux only (this is {sys.platform})"
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def build(march: str | None = None) -> ModuleType:
    """Compile (or load the cached build of) the kernels for `march` (default
    SHOAL_NATIVE_MARCH) and import it. Raises when the compiler fails; several targets can be
    loaded in one process (their module names differ)."""
    from torch.utils.cpp_extension import load as load_extension

    march = march or envs.refresh().native_march
    directory = build_dir(march)
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
        extra_cflags=[*_CFLAGS, f"-march={march}"],
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
                _module = build()
            except Exception as e:  # a missing compiler, a failed build: fall back
                _reason = f"build failed: {type(e).__name__}: {str(e).strip()[-500:]}"
        if _module is None:
            logger.info("native kernels not used: %s", _reason)
        else:
            logger.debug(
                "native kernels loaded (-march=%s; int8 dot products: %s)",
                envs.ENVS.native_march,
                "AVX-512 VNNI" if _module.vnni else "AVX2",
            )
        return _module


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not run or succeeded)."""
    return _reason
