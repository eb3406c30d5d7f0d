"""Where an engine step's CPU time goes: prefill and decode cost per token, and a breakdown of
decode steps (matmuls, attention, LM head, sampling, input preparation, scheduler, Python).

    python benchmarks/profile_engine_step.py                  # default model, batch 1 and 64
    python benchmarks/profile_engine_step.py --tiny --batch 64
    python benchmarks/profile_engine_step.py --quantization int8 --batch 1,16,64
    python benchmarks/profile_engine_step.py --quantization int8 --threads 2 --timing-only
    python benchmarks/profile_engine_step.py --quantization gguf --batch 1 --timing-only

Runs the offline engine (shoal's `LLM`, the same `EngineCore.step()` the server runs) in this
process and measures with the thread's CPU clock (`time.thread_time`, also cProfile's timer),
so other work on the machine slows the run down but hardly changes the figures. cProfile
adds about a microsecond per Python call, which inflates the Python share somewhat; the
un-profiled step CPU is reported beside it. Random token-id prompts, greedy, ignore_eos.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shoal import LLM, SamplingParams  # noqa: E402

# Buckets of decode-step CPU time: (label, functions whose cumulative time counts, by
# "file:function" suffix). Measured in this order; each is a disjoint part of the step.
BUCKETS = [
    ("attention (paged_attention)", ["attention.py:paged_attention"]),
    (
        "LM head (compute_logits, greedy head)",
        ["llama.py:compute_logits", "greedy_head.py:token_ids"],
    ),
    ("sampling (sample)", ["sampler.py:sample"]),
    (
        "input preparation (_prepare_inputs, _update_states)",
        ["model_runner.py:_prepare_inputs", "model_runner.py:_update_states"],
    ),  # fmt: skip
    (
        "scheduler (schedule, update_from_output)",
        ["scheduler.py:schedule", "scheduler.py:update_from_output"],
    ),  # fmt: skip
    ("output processing (detokenize, OutputProcessor)", ["output_processor.py:process_outputs"]),
]


def random_prompts(vocab_size: int, count: int, length: int, rng: random.Random) -> list[Any]:
    return [{"prompt_token_ids": [rng.randrange(3, vocab_size) for _ in range(length)]}
            for _ in range(count)]  # fmt: skip


def cpu_of(llm: LLM, prompts: list[Any], max_tokens: int) -> tuple[float, float]:
    """(CPU seconds of the whole process, wall seconds) of one `generate`; the process clock
    counts torch's worker threads too (--threads > 1)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    cpu, wall = time.process_time(), time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.process_time() - cpu, time.perf_counter() - wall


def _cumtime(stats: pstats.Stats, suffix: str) -> float:
    total = 0.0
    for (filename, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if f"{os.path.basename(filename)}:{name}" == suffix:
            total += row[3]
    return total


def _forward_time(stats: pstats.Stats) -> float:
    """Cumulative time of the runner's forward pass (the plain layers or the fused decode)."""
    return _cumtime(stats, "model_runner.py:_forward")


def _builtin_torch_time(stats: pstats.Stats) -> float:
    """tottime of C functions of torch (ops): what is left of a step is Python."""
    total = 0.0
    for (filename, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~" and ("torch" in name or "Tensor" in name):
            total += row[2]
    return total


def profile_batch(llm: LLM, batch: int, args: argparse.Namespace, rng: random.Random) -> None:
    vocab = llm.get_tokenizer().vocab_size
    # Warm up (first-call allocations), then prefill alone, then prefill + decode.
    cpu_of(llm, random_prompts(vocab, batch, args.input_len, rng), 2)
    prefill_s, prefill_wall = cpu_of(llm, random_prompts(vocab, batch, args.input_len, rng), 1)
    full_s, full_wall = cpu_of(
        llm, random_prompts(vocab, batch, args.input_len, rng), 1 + args.output_len
    )
    decode_step_s = (full_s - prefill_s) / args.output_len
    decode_wall = (full_wall - prefill_wall) / args.output_len
    num_prompt_tokens = batch * args.input_len
    print(f"\n== batch {batch}: {args.input_len} in, {args.output_len} decode steps")
    print(
        f"prefill: {prefill_s / num_prompt_tokens * 1e3:.3f} ms CPU per prompt token "
        f"({num_prompt_tokens / prefill_wall:.0f} prompt tok/s wall)"
    )
    print(
        f"decode:  {decode_step_s * 1e3:.1f} ms CPU per step = {decode_step_s / batch * 1e3:.2f} "
        f"ms per token ({batch / decode_wall:.0f} tok/s wall; no profiler)"
    )
    if args.timing_only:
        return
    # Profile prefill + decode, then subtract a prefill-only profile: the difference covers
    # the decode steps only.
    decode = _profiled(llm, random_prompts(vocab, batch, args.input_len, rng), args.output_len + 1)
    prefill = _profiled(llm, random_prompts(vocab, batch, args.input_len, rng), 1)
    step_total = _cumtime(decode, "core.py:step") - _cumtime(prefill, "core.py:step")
    steps = args.output_len
    print(f"profiled decode step: {step_total / steps * 1e3:.1f} ms CPU; of which")
    accounted = 0.0
    for label, suffixes in BUCKETS:
        value = sum(_cumtime(decode, s) - _cumtime(prefill, s) for s in suffixes)
        accounted += value
        print(f"  {value / step_total:6.1%}  {value / steps * 1e3:7.2f} ms  {label}")
    forward = _forward_time(decode) - _forward_time(prefill)
    print(f"  {forward / step_total:6.1%}  {forward / steps * 1e3:7.2f} ms  model forward "
          "(layers; includes the attention above)")  # fmt: skip
    torch_s = _builtin_torch_time(decode) - _builtin_torch_time(prefill)
    total = decode.total_tt - prefill.total_tt  # type: ignore[attr-defined]
    print(
        f"  torch ops (C) {torch_s / total:.1%} of the decode CPU; Python {1 - torch_s / total:.1%}"
    )
    if args.top:
        decode.sort_stats("tottime").print_stats(args.top)


def _profiled(llm: LLM, prompts: list[Any], max_tokens: int) -> pstats.Stats:
    profiler = cProfile.Profile(time.thread_time)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    profiler.runcall(llm.generate, prompts, params, use_tqdm=False)
    return pstats.Stats(profiler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--tiny", action="store_true", help="the tiny random model of the tests")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32, help="decode steps measured")
    p.add_argument("--top", type=int, default=0, help="also print the top-N functions")
    p.add_argument(
        "--quantization",
        default="none",
        choices=["none", "auto", "int8", "gguf"],
        help="none = the exact path; auto = what no flags run (default: none)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16"])
    p.add_argument(
        "--timing-only", action="store_true", help="prefill and decode timings, no profile"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: what `shoal serve`'s engine uses on 2 cores; the "
        "profile's breakdown counts the main thread only, so keep 1 for it)",
    )
    args = p.parse_args(argv)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = args.model, "auto"
        if args.tiny:
            from tests.helpers import make_tiny_model_dir

            model, load_format = make_tiny_model_dir(os.path.join(tmp, "tiny")), "dummy"
        llm = LLM(
            model, load_format=load_format, max_model_len=1024, num_blocks=2048,
            quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
            dtype=args.dtype,
        )  # fmt: skip
        import torch

        torch.set_num_threads(args.threads)
        print(
            f"model {model or 'default'}; {args.dtype}; quantization {args.quantization} (ran "
            f"{llm.engine.engine_core.model_runner.config.model.quantization}); KV cache "
            f"{args.kv_cache_dtype}; torch threads "
            f"{torch.get_num_threads()}; load average {os.getloadavg()}"
        )
        for batch in (int(b) for b in args.batch.split(",")):
            profile_batch(llm, batch, args, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
