"""The cost of structured outputs: grammar masking per token, and the compile's share of the
time to first token.

Three parts, on the default model (SmolLM2-135M-Instruct) in one `EngineCore`, no server:

1. **mask**: xgrammar alone for a realistic JSON schema (`SCHEMA`: an order with nested line
   items, enums, bounded strings and numbers): per step, fill the bitmask of B matchers
   (each at another point of a valid document) and apply it to [B, vocab] float32 logits.
   Per token = the step's cost / B. The minimum over `--repeats` (the machine is shared: the
   minimum is the cost, the rest is noise).
2. **step**: decode steps of B requests (B = 1 and 64), all unconstrained, then all under
   `SCHEMA`, interleaved `--rounds` times in the same run: the fastest step whose requests
   all decode, per token, and the difference (what masking adds in the engine).
3. **ttft**: one request with a schema the engine has not seen (the compile on the request's
   path, in the compile thread) against the same schema again (cached), and an unconstrained
   request, interleaved, best of 5; the first grammar of the process (loading xgrammar and
   the vocabulary) apart.

    .venv/bin/python benchmarks/structured_outputs.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "email", "tier"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["sku", "quantity", "price"],
            },
            "minItems": 1,
            "maxItems": 20,
        },
        "notes": {"type": ["string", "null"], "maxLength": 400},
        "paid": {"type": "boolean"},
    },
    "required": ["order_id", "customer", "items", "paid"],
}
DOCUMENT = {
    "order_id": "AB-123456",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "tier": "pro"},
    "items": [
        {"sku": "KB-01", "quantity": 2, "price": 49.5},
        {"sku": "MS-7", "quantity": 1, "price": 19.99},
    ],
    "notes": "Leave at the door, please.",
    "paid": True,
}


def _load() -> tuple[Any, Any, Any]:
    import torch

    from shoal.processing.tokenizer import Tokenizer
    from shoal.structured.backend import XgrammarBackend
    from shoal.structured.bitmask import apply_bitmask
    from shoal.structured.requests import structured_params

    tokenizer = Tokenizer.from_model(None)
    backend = XgrammarBackend(None, tokenizer.vocab_size)
    spec = structured_params(guided_json=SCHEMA)
    assert spec is not None
    return torch, (tokenizer, backend, spec), apply_bitmask


def mask_cost(batch: int, repeats: int) -> dict[str, float]:
    """Microseconds per token to fill and apply B rows, the matchers spread over a document."""
    torch, (tokenizer, backend, spec), apply_bitmask = _load()
    compiled = backend.compile(spec)
    text = json.dumps(DOCUMENT)
    ids = tokenizer.encode(text, add_special_tokens=False)
    matchers = []
    for i in range(batch):
        matcher = backend.matcher(compiled, tokenizer.eos_token_ids[0])
        for token in ids[: (i * 7) % len(ids)]:
            assert matcher.accept_token(token)
        matchers.append(matcher)
    bitmask = backend.allocate_bitmask(batch)
    logits = torch.randn(batch, tokenizer.vocab_size)
    rows = list(range(batch))
    fill, apply = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        mid = time.perf_counter()
        apply_bitmask(logits, bitmask, rows)
        fill.append(mid - start)
        apply.append(time.perf_counter() - mid)
    return {
        "fill_us_per_token": 1e6 * min(fill) / batch,
        "apply_us_per_token": 1e6 * min(apply) / batch,
        "total_us_per_token": 1e6 * (min(fill) + min(apply)) / batch,
    }


def llguidance_mask_cost(batch: int, repeats: int) -> dict[str, float] | None:
    """`mask_cost` with llguidance's matcher instead (None when llguidance is not importable:
    it is not a dependency; `pip install --target DIR llguidance` and PYTHONPATH=DIR)."""
    try:
        import llguidance
        import llguidance.torch as llg_torch
    except ImportError:
        return None
    torch, (tokenizer, _, _), apply_bitmask = _load()
    llg_tokenizer = llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=2
    )
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA),
        defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    )
    llguidance.LLMatcher(llg_tokenizer, grammar)
    compile_ms = 1e3 * (time.perf_counter() - start)
    ids = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    matchers = []
    for i in range(batch):
        matcher = llguidance.LLMatcher(llg_tokenizer, grammar)
        for token in ids[: (i * 7) % len(ids)]:
            matcher.consume_token(token)
        assert not matcher.is_error(), matcher.get_error()
        matchers.append(matcher)
    bitmask = llg_torch.allocate_token_bitmask(batch, tokenizer.vocab_size)
    fill = []
    for _ in range(repeats):
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            llg_torch.fill_next_token_bitmask(matcher, bitmask, row)
        fill.append(time.perf_counter() - start)
    return {"fill_us_per_token": 1e6 * min(fill) / batch, "compile_ms": compile_ms}


def _engine(max_num_seqs: int) -> Any:
    from shoal.config import ModelConfig, ParallelConfig, SchedulerConfig, ShoalConfig
    from shoal.engine.core import EngineCore

    config = ShoalConfig(
        model=ModelConfig(max_model_len=1024),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
        parallel=ParallelConfig(api_server_count=0),
    )
    return EngineCore(config)


def _requests(engine: Any, batch: int, tag: str, spec: Any, max_tokens: int) -> list[str]:
    from shoal.processing.tokenizer import Tokenizer
    from shoal.protocol import EngineCoreRequest
    from shoal.sampling_params import SamplingParams

    tokenizer = Tokenizer.from_model(None)
    ids = []
    for i in range(batch):
        prompt = tokenizer.encode(f"Order {i}: write it as JSON.", add_special_tokens=False)
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=spec
        )
        request_id = f"{tag}-{i}"
        engine.add_request(EngineCoreRequest(request_id, prompt, params, 2, time.time()))
        ids.append(request_id)
    return ids


def step_cost(engine: Any, batch: int, spec: Any, tag: str, max_tokens: int) -> float:
    """Milliseconds per token of the fastest step in which all `batch` requests decode (the
    machine is shared: the minimum is the cost)."""
    _requests(engine, batch, tag, spec, max_tokens)
    per_token = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        out = engine.step()
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.new_token_ids) for o in out.outputs)
        stats = out.scheduler_stats
        if tokens == batch and stats is not None and stats.num_ctx_requests == 0:
            per_token.append(1e3 * elapsed / tokens)
    return min(per_token) if per_token else float("nan")


def ttft_ms(engine: Any, spec: Any, tag: str) -> float:
    start = time.perf_counter()
    _requests(engine, 1, tag, spec, 2)
    while True:
        out = engine.step()
        if any(o.new_token_ids for o in out.outputs):
            elapsed = 1e3 * (time.perf_counter() - start)
            break
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=24)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from shoal.structured.requests import structured_params

    spec = structured_params(guided_json=SCHEMA)
    results: dict[str, Any] = {"mask": {}, "step": {}, "ttft": {}}
    for batch in (1, 64):
        results["mask"][batch] = mask_cost(batch, args.repeats)
        other = llguidance_mask_cost(batch, args.repeats)
        if other is not None:
            results.setdefault("llguidance_mask", {})[batch] = other
    engine = _engine(64)
    first = ttft_ms(engine, structured_params(guided_json={"type": "object"}), "first")
    for batch in (1, 64):
        plain, constrained = [], []
        for r in range(args.rounds):
            plain.append(step_cost(engine, batch, None, f"p{batch}-{r}", args.gen_len))
            constrained.append(step_cost(engine, batch, spec, f"j{batch}-{r}", args.gen_len))
        results["step"][batch] = {
            "plain_ms_per_token": min(plain),
            "json_schema_ms_per_token": min(constrained),
            "added_us_per_token": 1e3 * (min(constrained) - min(plain)),
        }
    new, cached, plain_ttft = [], [], []
    for i in range(5):
        fresh = {**SCHEMA, "title": f"order-{i}"}  # another schema: compiled on its path
        new.append(ttft_ms(engine, structured_params(guided_json=fresh), f"new-{i}"))
        cached.append(ttft_ms(engine, structured_params(guided_json=fresh), f"cached-{i}"))
        plain_ttft.append(ttft_ms(engine, None, f"plain-{i}"))
    results["ttft"] = {
        "first_grammar_of_process_ms": first,
        "new_schema_ms": min(new),
        "cached_schema_ms": min(cached),
        "unconstrained_ms": min(plain_ttft),
    }
    _print(results)
    from shoal.bench.report import cpu_model_name

    results["machine"] = {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"structured_outputs-{time.strftime('%Y%m%d-%H%M%S')}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")


def _print(results: dict[str, Any]) -> None:
    print("\nmask (xgrammar alone), microseconds per token")
    print(f"{'batch':>6} {'fill':>8} {'apply':>8} {'total':>8}")
    for batch, row in results["mask"].items():
        print(
            f"{batch:>6} {row['fill_us_per_token']:8.1f} {row['apply_us_per_token']:8.1f} "
            f"{row['total_us_per_token']:8.1f}"
        )
    for batch, row in results.get("llguidance_mask", {}).items():
        print(
            f"{batch:>6} llguidance fill {row['fill_us_per_token']:8.1f} us/token "
            f"(compile {row['compile_ms']:.1f} ms)"
        )
    print("\ndecode step (engine), milliseconds per token")
    print(f"{'batch':>6} {'plain':>8} {'json':>8} {'added us':>9}")
    for batch, row in results["step"].items():
        print(
            f"{batch:>6} {row['plain_ms_per_token']:8.3f} {row['json_schema_ms_per_token']:8.3f} "
            f"{row['added_us_per_token']:9.1f}"
        )
    print("\ntime to first token, milliseconds (best of 5, interleaved)")
    for name, value in results["ttft"].items():
        print(f"  {name:<30} {value:8.1f}")


if __name__ == "__main__":
    main()
