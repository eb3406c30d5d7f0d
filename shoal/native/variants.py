"""The instruction-set levels shoal's native kernels are compiled for, and which one a CPU runs.

Imported by `setup.py` (by path, before shoal is installed: so nothing here imports torch or
the rest of shoal) to compile one extension module per level when shoal is installed, and by
`shoal.native` to pick the best level this CPU runs. Every level compiles the same sources
(SOURCES: one per kernel family, and `module.cpp`, the Python module); the preprocessor picks
the instructions (`shared.h`'s SHOAL_VNNI and SHOAL_BF16), and every level gives the same bits
(tests/model/test_native_targets.py compares them).

Named `-march` levels, not `-march=native`: a wheel built on one machine must run on another,
and the build machine's CPU must not decide what the user's runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# module.cpp holds PYBIND11_MODULE and registers every family's kernels (declared in shared.h).
SOURCES = (
    "module.cpp",
    "int8.cpp",  # int8_linear, int8_linear_argmax
    "q4.cpp",  # q4_linear
    "attention.cpp",  # paged_decode_attention
    "elementwise.cpp",  # rms_norm, silu_mul, rope_and_cache
    "lm_head.cpp",  # pack_lm_head, lm_head_argmax, lm_head_argmax_bf16
    "decode_layers.cpp",  # decode_layers
)
# Included by the sources: part of the source hash, not compiled on their own.
HEADERS = ("shared.h",)
# -g0: no debug information (Python's own flags ask for -g: 17 MB modules, slower builds).
# -ffp-contract=off: no product is fused into an add unless the source says so (an fma
# intrinsic or std::fma). GCC otherwise decides per target and per loop, and a build with
# AVX-512 rounded some scalar tails differently from an AVX2 one.
CFLAGS = ("-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)

# x86-64-v3 as /proc/cpuinfo names it (lzcnt is "abm").
_V3_FLAGS = ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm")
_V4_FLAGS = (*_V3_FLAGS, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


@dataclass(frozen=True)
class Variant:
    """One compiled level: its name (SHOAL_NATIVE_ISA), the CPU flags it needs and its
    compiler target flags."""

    name: str
    cpu_flags: tuple[str, ...]
    march: tuple[str, ...]

    @property
    def module(self) -> str:
        """The extension's module name inside shoal.native."""
        return f"_kernels_{self.name}"

    def runs_on(self, flags: Iterable[str]) -> bool:
        return set(self.cpu_flags) <= set(flags)

    def cflags(self) -> list[str]:
        return [*CFLAGS, *self.march]


# Best first: `pick` takes the first one the CPU runs.
VARIANTS = (
    # Zen 4, Sapphire Rapids: VNNI integer products and the bf16-filtered greedy LM head.
    Variant(
        "avx512bf16",
        (*_V4_FLAGS, "avx512_vnni", "avx512_bf16"),
        ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"),
    ),
    # Ice Lake / Cascade Lake Xeons: VNNI, no BF16.
    Variant("avx512", (*_V4_FLAGS, "avx512_vnni"), ("-march=x86-64-v4", "-mavx512vnni")),
    # Everything else with AVX2 and FMA (Zen 1-3, Haswell and later, Skylake-X without VNNI).
    Variant("avx2", _V3_FLAGS, ("-march=x86-64-v3",)),
)
BY_NAME = {v.name: v for v in VARIANTS}


def pick(flags: Iterable[str]) -> Variant | None:
    """The best variant a CPU with these /proc/cpuinfo flags runs, or None."""
    flags = set(flags)
    return next((v for v in VARIANTS if v.runs_on(flags)), None)


def source_hash(variant: Variant, torch_version: str, directory: Path = HERE) -> str:
    """What a build of `variant` depends on besides the compiler: the sources and headers,
    the flags, and torch (the extension links against its C++ ABI). Compiled into the module
    (`source_hash`); `shoal.native` refuses a module whose hash differs (an edited kernel not
    rebuilt, or another torch)."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((directory / name).read_bytes())
    h.update(" ".join(variant.cflags()).encode())
    h.update(torch_version.encode())
    return h.hexdigest()[:16]
