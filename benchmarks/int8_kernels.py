"""Int8 linear kernels on the default model's shapes, against float32 `F.linear`.

    python benchmarks/int8_kernels.py                         # 1 thread, M = 1 16 64 256 2048
    python benchmarks/int8_kernels.py --threads 2 --m 1 64 --out /tmp/int8.json

Weights are int8 per output channel; activations are quantized per row (per token), which
keeps a row's result independent of the other rows (batch invariance). Weights are not
cache-resident: each call uses the next of `--layers` copies of the shape, as a forward pass
does. Candidates (all ms per call, CPU time of this thread group via `time.process_time`
beside wall time; the table shows the median of interleaved repetitions):

- fp32: `F.linear` (the float32 baseline).
- dynq_tensor: `quantized::linear_dynamic` (fbgemm; what `quantize_dynamic` runs), per-TENSOR
  activation scale: NOT batch invariant, shown for reference.
- fbgemm_row: rows divided by their max |x|, then
  `quantized::linear_with_input_q_dq_qweight_dq_output_fp32` with a fixed input scale 1/63 and
  zero point 64 (7-bit activations: AVX2's `vpmaddubsw` saturates 8-bit x 8-bit pair sums),
  the output multiplied back by each row's max.
- shoal_int8: shoal's `Int8Linear` (what `--quantization int8` runs), the native
  `int8_linear` kernel (shoal/native): 7-bit weights so that activations get 8 bits without
  saturating; 1/32 of the input channels are outliers (chosen by calibration at load; random
  here) added in float32, so they do not set the row's scale.
- onednn_row: the same per-row 7-bit activations quantized by hand (uint8 + zero point 64),
  `onednn::qlinear_pointwise` with input scale 1, float32 output, times each row's scale.
- int_mm: per-row int8 x int8 -> int32 `torch._int_mm` (M <= 16 only: 20-60x slower than fp32).
- shoal_q4: shoal's `Q4Linear` (what `--quantization gguf` runs on the default model), the
  native `q4_linear` kernel: the weight as GGUF Q4_1 blocks (5 bits per weight), activations
  quantized per row and 32-channel block. Its error column counts the 4-bit weights too.

    python benchmarks/int8_kernels.py --m 1 64 2048 --candidates shoal_int8 shoal_q4

Also prints each candidate's error against float32 and whether row 0 alone is bit-identical
to row 0 within the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shoal.model.gguf_quant import Q4Linear  # noqa: E402
from shoal.model.int8 import Int8Linear  # noqa: E402

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, vocab 49152.
SHAPES = {
    "qkv [960x576]": (960, 576),
    "o [576x576]": (576, 576),
    "gate_up [3072x576]": (3072, 576),
    "down [576x1536]": (576, 1536),
    "lm_head [49152x576]": (49152, 576),
}
NUM_LAYERS = 30
ACT_QMAX, ACT_ZP = 63, 64  # 7-bit activations, uint8 with zero point 64: [1, 127]


class Weights:
    """One weight shape in every candidate's format."""

    def __init__(self, n: int, k: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(n, k, generator=g) * 0.02
        self.scale = self.w.abs().amax(1).clamp_min(1e-12) / 127
        self.wq = torch.round(self.w / self.scale[:, None]).clamp_(-127, 127).to(torch.int8)
        zeros = torch.zeros(n, dtype=torch.long)
        qw = torch.quantize_per_channel(self.w, self.scale.double(), zeros, 0, torch.qint8)
        self.fbgemm = torch.ops.quantized.linear_prepack(qw, None)
        self.onednn = torch.ops.onednn.qlinear_prepack(self.wq, None)
        self.wq_t = self.wq.t().contiguous()
        outliers = torch.randperm(k, generator=g)[: k // 32]
        self.shoal = Int8Linear(self.w, None, outliers)
        raw = torch.from_numpy(quantize(self.w.numpy(), GGMLQuantizationType.Q4_1))
        self.q4 = Q4Linear(raw, GGMLQuantizationType.Q4_1, k, None)
        self.zeros = zeros


def fp32(x: torch.Tensor, w: Weights) -> torch.Tensor:
    return F.linear(x, w.w)


def dynq_tensor(x: torch.Tensor, w: Weights) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, w.fbgemm, True)


def fbgemm_row(x: torch.Tensor, w: Weights) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True).clamp_min_(1e-30)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x / amax, 1.0 / ACT_QMAX, ACT_ZP, w.fbgemm
    )
    return y.mul_(amax)


def shoal_int8(x: torch.Tensor, w: Weights) -> torch.Tensor:
    return w.shoal(x)


def shoal_q4(x: torch.Tensor, w: Weights) -> torch.Tensor:
    return w.q4(x)


def onednn_row(x: torch.Tensor, w: Weights) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True).clamp_min_(1e-30)
    qx = (x * (ACT_QMAX / amax)).round_().add_(ACT_ZP).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(
        qx, 1.0, ACT_ZP, w.onednn, w.scale, w.zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return y.mul_(amax / ACT_QMAX)


def int_mm(x: torch.Tensor, w: Weights) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True).clamp_min_(1e-30)
    qx = (x * (127 / amax)).round_().to(torch.int8)
    return torch._int_mm(qx, w.wq_t).float().mul_(w.scale).mul_(amax / 127)


CANDIDATES: dict[str, Callable[[torch.Tensor, Weights], torch.Tensor]] = {
    "fp32": fp32,
    "dynq_tensor": dynq_tensor,
    "fbgemm_row": fbgemm_row,
    "shoal_int8": shoal_int8,
    "shoal_q4": shoal_q4,
    "onednn_row": onednn_row,
    "int_mm": int_mm,
}


def time_calls(
    fn: Callable[[torch.Tensor, Weights], torch.Tensor],
    x: torch.Tensor,
    layers: list[Weights],
    min_s: float,
) -> tuple[float, float]:
    """(wall ms, CPU ms) per call, cycling through `layers` for at least `min_s` and one pass."""
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        for w in layers:
            fn(x, w)
        calls += len(layers)
        if time.perf_counter() - wall0 >= min_s:
            break
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return 1e3 * wall / calls, 1e3 * cpu / calls


def check(name: str, x: torch.Tensor, w: Weights) -> dict[str, Any]:
    fn = CANDIDATES[name]
    y = fn(x, w)
    ref = F.linear(x, w.w)
    alone = fn(x[:1].clone(), w)
    return {
        "rel_err": float((y - ref).norm() / ref.norm()),
        "batch_invariant": bool(torch.equal(alone[0], y[0])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=NUM_LAYERS, help="weight copies cycled")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--min-s", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()}")
    rows: list[dict[str, Any]] = []
    for shape_name, (n, k) in SHAPES.items():
        copies = 1 if n > 10000 else args.layers  # the LM head alone exceeds every cache
        layers = [Weights(n, k, seed) for seed in range(copies)]
        for m in args.m:
            x = torch.randn(m, k)
            if "down" in shape_name:  # post-SiLU activations: heavier tails
                x = F.silu(torch.randn(m, k) * 2) * torch.randn(m, k)
            names = [c for c in args.candidates if not (c == "int_mm" and m > 16)]
            samples: dict[str, list[tuple[float, float]]] = {c: [] for c in names}
            for name in names:
                CANDIDATES[name](x, layers[0])  # warm-up
            for _ in range(args.reps):
                for name in names:
                    samples[name].append(time_calls(CANDIDATES[name], x, layers, args.min_s))
            for name in names:
                wall = statistics.median(s[0] for s in samples[name])
                cpu = statistics.median(s[1] for s in samples[name])
                row = {"shape": shape_name, "m": m, "kernel": name, "wall_ms": wall,
                       "cpu_ms": cpu, **check(name, x, layers[0])}  # fmt: skip
                rows.append(row)
    # Speedups against fp32, or the first candidate when fp32 did not run.
    ref = "fp32" if "fp32" in args.candidates else args.candidates[0]
    base = {(r["shape"], r["m"]): r["cpu_ms"] for r in rows if r["kernel"] == ref}
    print(f"{'shape':22} {'M':>5} {'kernel':12} {'wall ms':>9} {'cpu ms':>9} "
          f"{'vs ' + ref:>8} {'rel err':>8} invariant")  # fmt: skip
    for r in rows:
        speedup = base[(r["shape"], r["m"])] / r["cpu_ms"]
        print(f"{r['shape']:22} {r['m']:5} {r['kernel']:12} {r['wall_ms']:9.3f} "
              f"{r['cpu_ms']:9.3f} {speedup:7.2f}x {r['rel_err']:8.4f} {r['batch_invariant']}")  # fmt: skip
    # One forward step's linears: 30 x (qkv + o + gate_up + down) + the LM head.
    print("\nper forward step (30 layers + LM head), CPU ms:")
    for m in args.m:
        for name in args.candidates:
            per = {r["shape"]: r["cpu_ms"] for r in rows if r["m"] == m and r["kernel"] == name}
            if len(per) == len(SHAPES):
                total = NUM_LAYERS * sum(v for s, v in per.items() if "lm_head" not in s)
                total += per["lm_head [49152x576]"]
                print(f"  M={m:5} {name:12} {total:9.1f}")
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", f"int8_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": args.threads,
                   "loadavg_end": os.getloadavg(), "rows": rows}, f, indent=1)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
