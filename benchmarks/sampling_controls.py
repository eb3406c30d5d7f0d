"""The cost of the logits controls (penalties, logit bias) and of prompt scoring.

Two parts, each variant interleaved with the plain one in the same run:

1. **sampler**: one `sample()` call on [batch, vocab] float32 logits (the default model's
   vocabulary) of greedy rows, each with `--prompt-len` prompt and `--output-len` output
   tokens of history, without controls and with each control; the minimum over
   `--repeats` calls (the machine is shared: the minimum is the cost, the rest is noise).
2. **engine** (skipped with `--skip-engine`): offline `LLM.generate` on the default model,
   `--batch` random prompts generating `--gen-len` tokens each, greedy, plain against
   penalties on every request: output tokens per second, best of `--engine-repeats`; and the
   time to score the same prompts (`max_tokens=0`, `prompt_logprobs=0`) against computing
   them with one generated token.

    .venv/bin/python benchmarks/sampling_controls.py [--skip-engine] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from shoal.bench.report import cpu_model_name
from shoal.sampling_params import SamplingParams
from shoal.worker.penalties import build_controls
from shoal.worker.sampler import SamplingBatch, sample

VOCAB = 49152  # SmolLM2's
VARIANTS: dict[str, dict[str, Any]] = {
    "frequency+presence": {"frequency_penalty": 0.5, "presence_penalty": 0.5},
    "repetition": {"repetition_penalty": 1.2},
    "all penalties": {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.2},
    "logit_bias (10 ids)": {"logit_bias": {i * 97: 1.5 for i in range(10)}},
}


@dataclass
class _History:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams


def _sampler_ms(batch: int, fields: dict[str, Any] | None, args: argparse.Namespace) -> float:
    rng = random.Random(0)
    length = args.prompt_len + args.output_len
    params = SamplingParams(**(fields or {}))
    histories = [
        _History([rng.randrange(VOCAB) for _ in range(length)], args.prompt_len, params)
        for _ in range(batch)
    ]
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(0))
    shared = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(args.repeats):
        step_batch = SamplingBatch(
            [0.0] * batch, [0] * batch, [1.0] * batch, [0.0] * batch, [None] * batch,
            [None] * batch, controls=build_controls(histories, [fields is not None] * batch),
        )  # fmt: skip
        work = logits.clone()
        start = time.perf_counter()
        sample(work, step_batch, shared)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def sampler_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for batch in (1, 64):
        plain = _sampler_ms(batch, None, args)
        for name, fields in VARIANTS.items():
            controlled = _sampler_ms(batch, fields, args)
            plain = min(plain, _sampler_ms(batch, None, args))
            rows.append(
                {"batch": batch, "variant": name, "plain_ms": plain, "controlled_ms": controlled}
            )
            print(
                f"sampler batch {batch:3d} {name:22s} plain {plain:7.3f} ms  "
                f"controlled {controlled:7.3f} ms  (+{(controlled - plain) / batch * 1e3:.1f} "
                "us per token)",
                flush=True,
            )
    return rows


def engine_part(args: argparse.Namespace) -> dict[str, Any]:
    from shoal import LLM

    llm = LLM(max_num_seqs=args.batch, num_blocks=args.batch * 16 + 64)
    rng = random.Random(1)
    prompts = [
        [rng.randrange(1000, VOCAB) for _ in range(args.prompt_len)] for _ in range(args.batch)
    ]
    plain = SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True)
    penalized = SamplingParams(
        temperature=0.0, max_tokens=args.gen_len, ignore_eos=True, **VARIANTS["all penalties"]
    )
    best: dict[str, float] = {"plain": 0.0, "penalties": 0.0}
    for _ in range(args.engine_repeats):
        for name, params in (("plain", plain), ("penalties", penalized)):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            rate = args.batch * args.gen_len / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
            print(f"engine {name:9s} {rate:8.1f} tok/s", file=sys.stderr, flush=True)
    scoring: dict[str, float] = {}
    for name, params in (
        ("one token", SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)),
        ("prompt_logprobs", SamplingParams(max_tokens=0, prompt_logprobs=0)),
    ):
        # New prompts each time: the prefix cache must not serve the one-token pass.
        fresh = [[rng.randrange(1000, VOCAB) for _ in p] for p in prompts]
        start = time.perf_counter()
        llm.generate(fresh, params, use_tqdm=False)
        scoring[name] = args.batch * args.prompt_len / (time.perf_counter() - start)
    print(
        f"engine batch {args.batch}: plain {best['plain']:.1f} tok/s, penalties "
        f"{best['penalties']:.1f} tok/s; prompt tokens/s: one generated token "
        f"{scoring['one token']:.0f}, prompt_logprobs {scoring['prompt_logprobs']:.0f}",
        flush=True,
    )
    return {"output_tok_s": best, "prompt_tok_s": scoring}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=100, help="history per row (sampler)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="engine part")
    parser.add_argument("--gen-len", type=int, default=24, help="engine part")
    parser.add_argument("--engine-repeats", type=int, default=2)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "cpu": cpu_model_name(),
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "sampler": sampler_part(args),
    }
    if not args.skip_engine:
        result["engine"] = engine_part(args)
    out = args.out or os.path.join(
        "benchmarks", "results", f"sampling_controls-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
