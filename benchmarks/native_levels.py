"""The native kernels' instruction-set levels against each other, on the default model's shapes.

    python benchmarks/native_levels.py                      # every level this CPU runs
    python benchmarks/native_levels.py --extra old=/path/to/other_build.so --threads 2

What a host without AVX-512 (or without BF16) runs is the `avx2` (or `avx512`) level: on an
AVX-512 machine this shows what each level costs, the same kernels on the same inputs. The
first module listed is the baseline of each row's ratio. `--extra NAME=PATH` adds another
build of the same kernels (for example a `-march=native` build, to see what the generic
tuning of the installed levels costs). Calls are interleaved round by round, so a host
whose speed drifts moves every module alike; the median of the rounds is reported, in
microseconds of wall time per call. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shoal import native  # noqa: E402
from shoal.bench.report import cpu_model_name  # noqa: E402
from shoal.model.gguf_quant import Q4Linear  # noqa: E402
from shoal.model.int8 import Int8Linear  # noqa: E402
from shoal.native.variants import VARIANTS  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536 (gate|up 3072), 9 heads / 3 KV heads of 64,
# vocab 49152, 30 layers.
LINEARS = {"gate_up [3072x576]": (3072, 576), "down [576x1536]": (576, 1536)}


def _load_extra(spec: str) -> tuple[str, ModuleType]:
    name, _, path = spec.partition("=")
    module_name = os.path.basename(path).split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(module_name, path)
    module_spec = importlib.util.spec_from_loader(module_name, loader)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    return name, module


def _cases(rows: list[int], g: torch.Generator) -> dict[str, Callable[[ModuleType], Any]]:
    cases: dict[str, Callable[[ModuleType], Any]] = {}
    for label, (n, k) in LINEARS.items():
        w = torch.randn(n, k, generator=g) * 0.05
        lin = Int8Linear(w, None, torch.tensor([1, 5, 100]))
        bufs = (lin.qweight, lin.w_scale, lin.w_colsum, lin.main_idx, lin.outlier_idx,
                lin.outlier_w, lin.bias)  # fmt: skip
        raw = torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType.Q4_1))
        q4 = Q4Linear(raw, GGMLQuantizationType.Q4_1, k, None)
        for m in rows:
            x = torch.randn(m, k, generator=g)
            cases[f"int8 {label} M={m}"] = lambda mod, x=x, bufs=bufs: mod.int8_linear(x, *bufs)
            cases[f"q4 {label} M={m}"] = lambda mod, x=x, q4=q4, n=n: mod.q4_linear(
                x, q4.packed, n, None
            )
    head = torch.randn(49152, 576, generator=g) * 0.05
    for m in rows:
        x = torch.randn(m, 576, generator=g)
        cases[f"lm_head_argmax M={m}"] = lambda mod, x=x: mod.lm_head_argmax(
            x, _packed(mod, head), 49152
        )
    # Decode attention: `rows` requests of 512 cached tokens each, float16 cache.
    block, kv_heads, dim = 16, 3, 64
    for m in rows:
        blocks = 512 // block
        cache = torch.randn(2, m * blocks, block, kv_heads, dim, generator=g).half()
        table = torch.arange(m * blocks, dtype=torch.int64).view(m, blocks)
        lens = torch.full((m,), 512, dtype=torch.int64)
        q = torch.randn(m, 9, dim, generator=g)
        cases[f"attention 512 tok M={m}"] = lambda mod, q=q, c=cache, t=table, lens=lens: (
            mod.paged_decode_attention(q, c, t, lens, dim**-0.5, 0)
        )
    return cases


_PACKED: dict[int, Any] = {}


def _packed(mod: ModuleType, weight: torch.Tensor) -> Any:
    if id(mod) not in _PACKED:
        _PACKED[id(mod)] = mod.pack_lm_head(weight)
    return _PACKED[id(mod)]


def _time(fn: Callable[[], Any], min_s: float = 0.05) -> float:
    """Microseconds per call: repeat until `min_s` has passed."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", action="append", default=[], help="NAME=PATH of a module")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = native.cpu_flags()
    modules = [
        (v.name, native.load_variant(v.name)) for v in reversed(VARIANTS) if v.runs_on(flags)
    ]
    modules += [_load_extra(spec) for spec in args.extra]
    cases = _cases(args.rows, torch.Generator().manual_seed(0))
    samples: dict[str, dict[str, list[float]]] = {c: {n: [] for n, _ in modules} for c in cases}
    for _ in range(args.rounds):
        for case, fn in cases.items():
            for name, mod in modules:
                samples[case][name].append(_time(lambda fn=fn, mod=mod: fn(mod)))
    cpu = cpu_model_name()
    names = [n for n, _ in modules]
    print(f"CPU: {cpu}; torch threads {args.threads}; median of {args.rounds} rounds, us/call")
    print(f"{'case':36}" + "".join(f"{n:>14}" for n in names) + "   ratios to " + names[0])
    results: dict[str, dict[str, float]] = {}
    for case in cases:
        med = {n: statistics.median(samples[case][n]) for n in names}
        results[case] = med
        ratios = " ".join(f"{med[names[0]] / med[n]:.2f}x" for n in names[1:])
        print(f"{case:36}" + "".join(f"{med[n]:14.1f}" for n in names) + "   " + ratios)
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", f"native_levels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {"cpu": cpu, "threads": args.threads, "modules": names, "us": results}, f, indent=1
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
