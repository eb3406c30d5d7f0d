"""Offline throughput: shoal's `LLM.generate` against transformers' batched `generate`.

    python benchmarks/offline_throughput.py                # int8 and float32, 64 x (128 in, 128 out)
    python benchmarks/offline_throughput.py --num-prompts 8 --input-len 32 --output-len 16
    python benchmarks/offline_throughput.py --skip-hf --out /tmp/shoal.json
    python benchmarks/offline_throughput.py --quantization gguf,none   # both, one HF baseline

Random prompts (token ids drawn from the vocabulary, special tokens left out), greedy, every
request generating exactly --output-len tokens (ignore_eos). Prints output tok/s, prefill
tok/s (a separate max_tokens=1 pass over other random prompts, so the prefix cache cannot
help) and peak RSS for shoal, then the same for transformers (batch --hf-batch-size, each
--hf-dtypes entry), the ratios, and writes everything as JSON to --out. Progress on stderr.
With several --quantization entries shoal runs once per entry (fresh engine each) against
one transformers baseline; "shoal" in the JSON is the first entry, "shoal_runs" all of them
(peak RSS is the process's, so it only grows from one entry to the next).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shoal import LLM, SamplingParams  # noqa: E402
from shoal.config import DTYPES, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS  # noqa: E402
from shoal.model_source import resolve_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=None, help="HF directory or .gguf (default: the default model)"
    )
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="shoal's dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--quantization",
        default="int8,none",
        help=f"comma-separated shoal weight quantizations to run in turn: none, "
        f"{', '.join(QUANTIZATIONS)}; an entry may name a KV cache dtype after a colon, "
        f"e.g. int8:float32 (default: %(default)s)",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --num-prompts")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="shoal's step token budget (default: shoal's own, 512 on CPU; runs before "
        "2026-12-04 used 2048)",
    )
    p.add_argument(
        "--num-blocks", type=int, default=None, help="default: enough for every request at once"
    )
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument(
        "--hf-dtypes",
        default="float32",
        help="comma-separated transformers dtypes (float32, bfloat16)",
    )
    p.add_argument("--skip-hf", action="store_true", help="measure shoal only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default: benchmarks/results/offline_throughput-<time>.json)",
    )
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "hf_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1")
    args.quantizations = [q.strip() for q in args.quantization.split(",") if q.strip()]
    for entry in args.quantizations:
        q, _, kv = entry.partition(":")
        if q != "none" and q not in QUANTIZATIONS:
            p.error(f"--quantization: {q!r} is not none or one of {QUANTIZATIONS}")
        if kv and kv not in KV_CACHE_DTYPES:
            p.error(f"--quantization: KV cache dtype {kv!r} is not one of {KV_CACHE_DTYPES}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_prompts(llm: LLM, count: int, length: int, seed: int) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    special = set(tokenizer.all_special_ids)
    candidates = [i for i in range(tokenizer.vocab_size) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(candidates) for _ in range(length)] for _ in range(count)]


def run_shoal(
    args: argparse.Namespace, entry: str
) -> tuple[dict[str, Any], list[list[int]], list[list[int]]]:
    quantization, _, kv_cache_dtype = entry.partition(":")
    num_blocks = args.num_blocks or args.num_prompts * (
        -(-(args.input_len + args.output_len) // 16) + 1
    )
    log(f"shoal: loading ({args.dtype}, quantization {quantization}, {num_blocks} KV blocks) ...")
    start = time.perf_counter()
    llm = LLM(
        args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        num_blocks=num_blocks,
        max_num_seqs=args.max_num_seqs or args.num_prompts,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        quantization=None if quantization == "none" else quantization,
        kv_cache_dtype=kv_cache_dtype or "auto",
    )
    load_s = time.perf_counter() - start
    prompts = random_prompts(llm, args.num_prompts, args.input_len, args.seed)
    prefill_prompts = random_prompts(llm, args.num_prompts, args.input_len, args.seed + 1)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)

    log("shoal: prefill pass (max_tokens=1) ...")
    start = time.perf_counter()
    llm.generate(
        [{"prompt_token_ids": p} for p in prefill_prompts],
        SamplingParams(temperature=0.0, max_tokens=1),
        use_tqdm=True,
    )
    prefill_s = time.perf_counter() - start

    log("shoal: full run ...")
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    steps_before = llm.stats.num_steps
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    outputs = [o.outputs[0].token_ids for o in outs]
    num_out = sum(map(len, outputs))
    result = {
        "quantization": quantization,
        "kv_cache_dtype": kv_cache_dtype or "auto",
        "load_s": load_s,
        "elapsed_s": elapsed,
        "num_steps": llm.stats.num_steps - steps_before,
        "output_tok_per_s": num_out / elapsed,
        "total_tok_per_s": (num_out + args.num_prompts * args.input_len) / elapsed,
        "requests_per_s": args.num_prompts / elapsed,
        "prefill_tok_per_s": args.num_prompts * args.input_len / prefill_s,
        "peak_rss_mib": peak_rss_mib(),
        "max_model_len": llm.max_model_len,
    }
    return result, prompts, outputs


def load_hf_model(args: argparse.Namespace, dtype_name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    source = resolve_model(args.model)
    if source.is_gguf:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source.path),
            gguf_file=os.path.basename(source.path),
            dtype=torch.float32,  # dequantized to float32, then cast
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.to(dtype=dtype, device=args.device).eval()


def run_hf(
    args: argparse.Namespace,
    dtype_name: str,
    prompts: list[list[int]],
    shoal_outputs: list[list[int]],
) -> dict[str, Any]:
    import torch

    log(f"transformers ({dtype_name}): loading ...")
    start = time.perf_counter()
    model = load_hf_model(args, dtype_name)
    load_s = time.perf_counter() - start
    batches = [
        prompts[i : i + args.hf_batch_size] for i in range(0, len(prompts), args.hf_batch_size)
    ]
    with torch.inference_mode():
        x = torch.tensor(batches[0], device=args.device)
        model(x[:, :8])  # warm-up
        start = time.perf_counter()
        model(x)
        prefill_s = time.perf_counter() - start
        outputs: list[list[int]] = []
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            log(f"transformers ({dtype_name}): batch {i + 1}/{len(batches)}")
            x = torch.tensor(batch, device=args.device)
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=0,
            )
            outputs += out[:, x.shape[1] :].tolist()
        elapsed = time.perf_counter() - start
    num_out = sum(map(len, outputs))
    del model
    return {
        "load_s": load_s,
        "elapsed_s": elapsed,
        "batch_size": args.hf_batch_size,
        "output_tok_per_s": num_out / elapsed,
        "total_tok_per_s": (num_out + len(prompts) * args.input_len) / elapsed,
        "prefill_tok_per_s": len(batches[0]) * args.input_len / prefill_s,
        "peak_rss_mib_process": peak_rss_mib(),
        # Greedy sequences identical to shoal's (batched float32 math can differ in the last
        # bits, so a near-tie may flip a token and everything after it).
        "num_sequences_identical_to_shoal": sum(
            a == b for a, b in zip(outputs, shoal_outputs, strict=True)
        ),
    }


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import gc

    runs: dict[str, dict[str, Any]] = {}
    all_outputs: dict[str, list[list[int]]] = {}
    for quantization in args.quantizations:
        result, prompts, all_outputs[quantization] = run_shoal(args, quantization)
        gc.collect()  # the previous engine's weights and KV cache
        runs[quantization] = result
        print(
            f"shoal ({args.dtype}, quantization {quantization}): "
            f"{result['output_tok_per_s']:.1f} output tok/s, "
            f"{result['prefill_tok_per_s']:.1f} prefill tok/s, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
    first = args.quantizations[0]
    outputs = all_outputs[first]
    for quantization in args.quantizations[1:]:
        same = sum(a == b for a, b in zip(all_outputs[quantization], outputs, strict=True))
        runs[quantization][f"num_sequences_identical_to_{first}"] = same
        print(f"quantization {quantization}: {same}/{len(outputs)} sequences identical to {first}")
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(),
        "shoal": runs[first],
        "shoal_runs": runs,
        "hf": {},
        "ratios": {},
    }
    if not args.skip_hf:
        for dtype_name in [d.strip() for d in args.hf_dtypes.split(",") if d.strip()]:
            hf = run_hf(args, dtype_name, prompts, outputs)
            report["hf"][dtype_name] = hf
            for quantization, result in runs.items():
                ratio = result["output_tok_per_s"] / hf["output_tok_per_s"]
                suffix = "" if quantization == first else f"_{quantization}"
                report["ratios"][f"output_tok_per_s_vs_hf_{dtype_name}{suffix}"] = ratio
                print(
                    f"transformers ({dtype_name}, batch {args.hf_batch_size}): "
                    f"{hf['output_tok_per_s']:.1f} output tok/s, {hf['prefill_tok_per_s']:.1f} "
                    f"prefill tok/s; shoal ({quantization}) / transformers = {ratio:.2f}x"
                )
            print(
                f"identical sequences (shoal {first} vs transformers): "
                f"{hf['num_sequences_identical_to_shoal']}/{len(prompts)}"
            )
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", f"offline_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
