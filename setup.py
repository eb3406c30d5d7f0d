"""Builds shoal's native CPU kernels when shoal is installed (`pip install .`, a wheel, or
`pip install -e .`): one extension module per instruction-set level of
shoal/native/variants.py, so nothing is compiled when shoal serves and the package needs no
compiler after install. Everything else about the package is in pyproject.toml.

torch must be importable here (its headers and C++ ABI): pyproject.toml's build requirements
name the same torch as its run-time dependency, and scripts/bootstrap.sh installs with
`--no-build-isolation` after installing torch. No kernels are built (shoal then runs on torch
ops, and says so once at start) when SHOAL_NATIVE_BUILD=0, off x86-64 Linux, or without
torch; a failed compile of one level is a warning, not a failed install (`optional`).
`python -m shoal.native` tells which levels were built and which one this CPU loads.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "shoal" / "native"


def _variants_module():
    """shoal/native/variants.py, loaded by path (shoal itself is not importable yet)."""
    spec = importlib.util.spec_from_file_location("_shoal_native_variants", NATIVE / "variants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _skip_reason() -> str | None:
    if os.environ.get("SHOAL_NATIVE_BUILD", "1").strip().lower() in ("0", "false", "no", "off"):
        return "SHOAL_NATIVE_BUILD=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernels are x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed in the build environment"
    return None


def _extensions_and_cmdclass() -> tuple[list, dict]:
    reason = _skip_reason()
    if reason is not None:
        print(f"shoal: native kernels not built: {reason}", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    variants = _variants_module()

    class BuildKernels(BuildExtension):
        """Each level in its own temporary directory: the levels compile the same sources,
        and one object path shared between them would let one level link another's."""

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                print(f"shoal: compiling native kernels {ext.name} (a minute or more)", flush=True)
                super().build_extension(ext)
            finally:
                self.build_temp = base

    extensions = []
    for variant in variants.VARIANTS:
        digest = variants.source_hash(variant, torch.__version__, NATIVE)
        extensions.append(
            CppExtension(
                name=f"shoal.native.{variant.module}",
                sources=[f"shoal/native/{name}" for name in variants.SOURCES],
                extra_compile_args=[*variant.cflags(), f"-DSHOAL_SOURCE_HASH=h{digest}"],
                extra_link_args=list(variants.LDFLAGS),
                depends=[f"shoal/native/{name}" for name in variants.HEADERS],
                optional=True,
            )
        )
    return extensions, {"build_ext": BuildKernels.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
