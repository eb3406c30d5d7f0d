"""Quality of each weight mode of the default model, with llama.cpp's perplexity beside it.

For every mode (float32, `--quantization int8`, `--quantization gguf`, any other entry of
`shoal.config.QUANTIZATIONS`, and `--dtype bfloat16`), in one process, one mode at a time:

1. **Perplexity** of a fixed English text (benchmarks/data/alice29.txt, public domain; its
   source: benchmarks/data/README.md), computed through shoal's own engine: offline `LLM`
   requests with `max_tokens=0, prompt_logprobs=1`. The scheme is llama-perplexity's: the
   text's token ids cut into consecutive windows of `--ctx` tokens (no BOS: the model's GGUF
   says `add_bos_token = false`), each window a fresh request, and only the second half of
   each window scored (positions ctx/2 + 1 .. ctx - 1: every scored token sees at least
   ctx/2 tokens of context). PPL = exp(mean negative log-likelihood over the scored tokens).
   Beside it, the share of scored positions whose top-1 token equals float32's.
2. **Greedy agreement with float32**: a fixed prompt set (hand-written prompts plus excerpts
   of the text), `--gen-len` tokens each at temperature 0 with `ignore_eos`: per prompt the
   tokens that match float32's before the first divergence, and the share of continuations
   equal to float32's token for token.
3. **Chat answers**: a handful of fixed questions through the chat template at
   temperature 0, each checked against a pattern of the right answer.

The anchor, in the same run: `llama-perplexity` (built by benchmarks/setup_llama_cpp.sh) on
the same GGUF file and the same text with the same `--ctx` and number of windows; and
`llama-tokenize` beside it, to check that both tokenize the text to the same ids.

    .venv/bin/python benchmarks/quality.py
    benchmarks/setup_llama_cpp.sh   # once: /tmp/llama.cpp-build/build/bin/llama-perplexity
    .venv/bin/python benchmarks/quality.py --llama-perplexity PATH
    .venv/bin/python benchmarks/quality.py --modes float32,gguf --max-windows 8   # quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(REPO, "benchmarks", "data", "alice29.txt")

# Hand-written completion prompts for the greedy agreement (the text's excerpts are added).
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
    "The most important thing to remember when learning a new language is",
    "In 1492, Christopher Columbus",
    "Here is a short recipe for pancakes:\n1.",
    "The theory of evolution by natural selection states that",
    "Dear Sir or Madam,\n\nI am writing to",
    "The largest planet in our solar system is",
    "To sort a list of numbers in Python, you can",
    "The French Revolution began in",
    "Photosynthesis is the process by which",
    "My favourite season of the year is autumn, because",
    "A healthy breakfast usually includes",
]
NUM_EXCERPTS = 16
EXCERPT_TOKENS = 48

# (question, a regular expression the right answer matches, case-insensitive)
QUESTIONS = [
    ("What is the capital of France?", r"\bparis\b"),
    ("What is 7 times 8?", r"\b56\b|fifty-six"),
    ("Who wrote Romeo and Juliet?", r"shakespeare"),
    ("What is the largest planet in our solar system?", r"jupiter"),
    ("At what temperature in degrees Celsius does water boil at sea level?", r"\b100\b"),
    ("What is the chemical symbol for gold?", r"\bau\b"),
    ("How many days are there in a week?", r"\bseven\b|\b7\b"),
    ("Translate 'good morning' into Spanish.", r"buenos d[ií]as"),
]


def modes_table() -> dict[str, dict[str, Any]]:
    """Mode name -> `LLM` settings: float32 (`--quantization none`: no flags now run the
    default mode, `auto`, which `default_mode` names), every `--quantization` the code has,
    and bfloat16 weights."""
    from shoal.config import QUANTIZATIONS

    modes: dict[str, dict[str, Any]] = {"float32": {"quantization": "none"}}
    for quantization in QUANTIZATIONS:
        modes[quantization] = {"quantization": quantization}
    modes["bfloat16"] = {"dtype": "bfloat16"}
    return modes


# ------------------------------------------------------------------------------- perplexity


def read_text(path: str) -> str:
    """The text as llama.cpp's `-f` reads it: the file, less one trailing newline."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text[:-1] if text.endswith("\n") else text


def split_windows(token_ids: Sequence[int], ctx: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive windows of `ctx` tokens (the remainder is dropped), at most `max_windows`:
    llama-perplexity's chunks."""
    num = len(token_ids) // ctx
    if max_windows is not None:
        num = min(num, max_windows)
    return [list(token_ids[i * ctx : (i + 1) * ctx]) for i in range(num)]


def perplexity(llm: Any, windows: list[list[int]]) -> dict[str, Any]:
    """Perplexity of `windows` through `llm` (a `shoal.LLM`), scoring each window's positions
    ctx/2 + 1 .. ctx - 1 as llama-perplexity does. Returns `ppl`, its standard error
    (llama.cpp's `+/-`), the scored token count and, per scored position, the top-1 token."""
    from shoal import SamplingParams

    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    elapsed_s = time.perf_counter() - start
    nlls: list[float] = []
    top1: list[int] = []
    for window, output in zip(windows, outputs, strict=True):
        positions = output.prompt_logprobs
        for j in range(len(window) // 2 + 1, len(window)):
            entry = positions[j]  # logprobs of token j given tokens 0 .. j-1
            nlls.append(-entry[window[j]].logprob)
            # The chosen token comes first, the best alternative last (one entry if the same).
            top1.append(list(entry)[-1])
    mean = sum(nlls) / len(nlls)
    var = sum(x * x for x in nlls) / len(nlls) - mean * mean
    stderr = math.sqrt(max(var, 0.0) / max(len(nlls) - 1, 1)) * math.exp(mean)
    evaluated = sum(len(w) for w in windows)
    return {
        "ppl": math.exp(mean),
        "ppl_stderr": stderr,
        "mean_nll": mean,
        "num_scored_tokens": len(nlls),
        "num_evaluated_tokens": evaluated,
        "seconds": elapsed_s,
        "evaluated_tok_s": evaluated / elapsed_s,
        "top1": top1,
        "nlls": nlls,
    }


def top1_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Share of positions whose top-1 token is the same."""
    same = sum(a == b for a, b in zip(reference, candidate, strict=True))
    return same / len(reference)


def paired_ratio(reference: Sequence[float], candidate: Sequence[float]) -> tuple[float, float]:
    """PPL(candidate) / PPL(reference) - 1 over the same tokens, and its standard error from
    the per-token differences of negative log-likelihood (far smaller than either PPL's own
    error: both modes see the same hard and easy tokens)."""
    diffs = [c - r for r, c in zip(reference, candidate, strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum(d * d for d in diffs) / len(diffs) - mean * mean
    stderr = math.sqrt(max(var, 0.0) / max(len(diffs) - 1, 1))
    return math.exp(mean) - 1, stderr * math.exp(mean)


# ------------------------------------------------------------------------ greedy and chat


def agreement_prompts(tokenizer: Any, token_ids: Sequence[int]) -> list[Any]:
    """`PROMPTS` plus `NUM_EXCERPTS` excerpts of `EXCERPT_TOKENS` tokens spread evenly over
    the text (as token-id prompts)."""
    step = (len(token_ids) - EXCERPT_TOKENS) // NUM_EXCERPTS
    excerpts = [
        {"prompt_token_ids": list(token_ids[i * step : i * step + EXCERPT_TOKENS])}
        for i in range(NUM_EXCERPTS)
    ]
    return [*PROMPTS, *excerpts]


def greedy_continuations(llm: Any, prompts: list[Any], gen_len: int) -> list[list[int]]:
    from shoal import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def greedy_agreement(
    reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Per continuation, the tokens equal to the reference's before the first divergence; their
    mean (also as a share of the length) and the share of continuations equal throughout."""
    prefixes = []
    for ref, cand in zip(reference, candidate, strict=True):
        n = 0
        while n < min(len(ref), len(cand)) and ref[n] == cand[n]:
            n += 1
        prefixes.append(n)
    exact = sum(list(r) == list(c) for r, c in zip(reference, candidate, strict=True))
    total = sum(len(r) for r in reference)
    return {
        "mean_prefix_tokens": sum(prefixes) / len(prefixes),
        "prefix_share": sum(prefixes) / total,
        "exact_share": exact / len(reference),
        "prefixes": prefixes,
    }


def chat_answers(llm: Any, max_tokens: int) -> list[dict[str, Any]]:
    from shoal import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    conversations = [[{"role": "user", "content": q}] for q, _ in QUESTIONS]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    answers = []
    for (question, pattern), output in zip(QUESTIONS, outputs, strict=True):
        text = output.outputs[0].text
        is_right = re.search(pattern, text, re.IGNORECASE) is not None
        answers.append({"question": question, "answer": text, "is_right": is_right})
    return answers


# --------------------------------------------------------------------------------- modes


def run_mode(
    name: str, settings: dict[str, Any], windows: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    """Load the default model in mode `name` and measure it; the model is freed after."""
    from shoal import LLM

    log(f"[{name}] loading {settings or '(no flags)'}")
    start = time.perf_counter()
    llm = LLM(args.model, **settings)
    load_s = time.perf_counter() - start
    runner = llm.engine.engine_core.model_runner
    result: dict[str, Any] = {
        "settings": settings,
        "quantization": runner.config.model.quantization,  # what the engine ran
        "load_s": load_s,
        "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
    }
    result["perplexity"] = perplexity(llm, windows)
    log(f"[{name}] PPL {result['perplexity']['ppl']:.4f} in {result['perplexity']['seconds']:.0f}s")
    prompts = agreement_prompts(llm.get_tokenizer(), args.token_ids)
    start = time.perf_counter()
    result["greedy"] = greedy_continuations(llm, prompts, args.gen_len)
    result["greedy_s"] = time.perf_counter() - start
    result["chat"] = chat_answers(llm, args.chat_max_tokens)
    log(f"[{name}] greedy {result['greedy_s']:.0f}s; chat: {result['chat'][0]['answer']!r}")
    del llm
    gc.collect()
    return result


def compare_to_reference(results: dict[str, dict[str, Any]], reference: str) -> None:
    """Fill each mode's agreement with the `reference` mode (in place)."""
    ref = results[reference]
    for result in results.values():
        result["top1_agreement"] = top1_agreement(
            ref["perplexity"]["top1"], result["perplexity"]["top1"]
        )
        result["greedy_agreement"] = greedy_agreement(ref["greedy"], result["greedy"])
        ratio, stderr = paired_ratio(ref["perplexity"]["nlls"], result["perplexity"]["nlls"])
        result["ppl_vs_reference"], result["ppl_vs_reference_stderr"] = ratio, stderr


# ----------------------------------------------------------------------------- llama.cpp


def parse_llama_perplexity(output: str) -> dict[str, Any]:
    """The figures of llama-perplexity's log: the final PPL and its +/-, the window count."""
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", output)
    if final is None:
        raise ValueError("no 'Final estimate: PPL = ...' in llama-perplexity's output")
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", output)
    return {
        "ppl": float(final.group(1)),
        "ppl_stderr": float(final.group(2)),
        "num_windows": int(chunks.group(1)) if chunks else None,
        "ctx": int(chunks.group(2)) if chunks else None,
    }


def llama_cpp_anchor(
    binary: str | None, model_path: str, text: str, token_ids: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """llama.cpp's perplexity of the same file and text, or why it was skipped."""
    if binary is None or not os.access(binary, os.X_OK):
        return {"skipped": "not built (benchmarks/setup_llama_cpp.sh)", "binary": binary}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(text)  # no trailing newline: both tools read exactly `text`
    try:
        anchor: dict[str, Any] = {"binary": binary}
        anchor.update(_same_tokens(binary, model_path, f.name, token_ids))
        threads = str(args.llama_threads or os.cpu_count() or 1)
        cmd = [binary, "-m", model_path, "-f", f.name, "-c", str(args.ctx), "-t", threads]
        cmd += ["--chunks", str(args.num_windows)]
        log("[llama.cpp] " + " ".join(cmd))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.llama_timeout_s)
        anchor["seconds"] = time.perf_counter() - start
        if proc.returncode != 0:
            anchor["error"] = f"exit {proc.returncode}: {proc.stderr[-2000:]}"
            return anchor
        anchor.update(parse_llama_perplexity(proc.stdout + proc.stderr))
        anchor["command"] = cmd
        log(f"[llama.cpp] PPL {anchor['ppl']:.4f} in {anchor['seconds']:.0f}s")
        return anchor
    finally:
        os.unlink(f.name)


def _same_tokens(binary: str, model_path: str, text_path: str, token_ids: list[int]) -> dict:
    """Whether llama-tokenize (beside `binary`) gives the text the ids shoal gives it."""
    tokenize = os.path.join(os.path.dirname(binary), "llama-tokenize")
    if not os.access(tokenize, os.X_OK):
        return {"tokens_checked": False}
    cmd = [tokenize, "-m", model_path, "-f", text_path, "--ids", "--no-escape", "--log-disable"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    theirs = [int(t) for t in re.findall(r"-?\d+", proc.stdout.strip().splitlines()[-1])]
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(theirs, token_ids, strict=False)) if a != b), None
    )
    return {
        "tokens_checked": True,
        "tokens_identical": theirs == token_ids,
        "llama_cpp_num_tokens": len(theirs),
        "first_differing_token": first_diff,
    }


# -------------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    modes, anchor = report["modes"], report["llama_cpp"]
    lines = [
        f"No flags run {report.get('default_mode', '?')}",
        "",
        f"CPU: {report['machine']['cpu']} ({report['machine']['flags']}); text: "
        f"{report['text']['name']}, {report['text']['num_tokens']} tokens; "
        f"{report['num_windows']} windows of {report['ctx']}, "
        f"{next(iter(modes.values()))['perplexity']['num_scored_tokens']} scored",
        "",
        "| mode | PPL (+/-) | vs float32 (+/-) | top-1 = float32 | greedy prefix (share) "
        "| greedy equal | chat right | KV | PPL pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        p, g = m["perplexity"], m["greedy_agreement"]
        right = sum(a["is_right"] for a in m["chat"])
        lines.append(
            f"| {name} | {p['ppl']:.4f} ({p['ppl_stderr']:.4f}) "
            f"| {m['ppl_vs_reference']:+.2%} ({m['ppl_vs_reference_stderr']:.2%}) "
            f"| {m['top1_agreement']:.1%} | {g['mean_prefix_tokens']:.1f} ({g['prefix_share']:.0%}) "
            f"| {g['exact_share']:.0%} | {right}/{len(m['chat'])} | {m['kv_cache_dtype']} "
            f"| {p['seconds']:.0f} s |"
        )
    if "ppl" in anchor:
        gguf = modes.get("gguf")
        vs = f", shoal gguf {gguf['perplexity']['ppl'] / anchor['ppl'] - 1:+.2%}" if gguf else ""
        lines.append(
            f"| llama.cpp (same GGUF) | {anchor['ppl']:.4f} ({anchor['ppl_stderr']:.4f}) | "
            f"{anchor['ppl'] / modes['float32']['perplexity']['ppl'] - 1:+.2%} | | | | | "
            f"| {anchor['seconds']:.0f} s |"
        )
        lines += ["", f"llama.cpp: tokens identical {anchor.get('tokens_identical')}{vs}"]
    else:
        lines += ["", f"llama.cpp: {anchor.get('skipped') or anchor.get('error')}"]
    lines += ["", "| question | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for i, (question, _) in enumerate(QUESTIONS):
        cells = [_cell(m["chat"][i]) for m in modes.values()]
        lines.append(f"| {question} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(answer: dict[str, Any]) -> str:
    text = " ".join(answer["answer"].split())
    text = text if len(text) <= 60 else text[:57] + "..."
    return ("" if answer["is_right"] else "(wrong) ") + text.replace("|", "/")


def machine() -> dict[str, Any]:
    import torch

    cpu, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1)  # type: ignore[union-attr]
        have = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())  # type: ignore[union-attr]
        flags = ", ".join(x for x in ("avx2", "avx512_vnni", "avx512_bf16") if x in have)
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "flags": flags,
        "num_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0],
    }


def default_mode(model: str | None) -> str:
    """What `shoal serve` / `LLM()` with no flags runs on `model` here, and why (the engine's
    start-up log line, shoal/model/mode.py)."""
    import torch

    from shoal.config import ModelConfig
    from shoal.model.mode import choose_mode
    from shoal.model_source import resolve_model

    config = ModelConfig(model=model)
    return choose_mode(config, resolve_model(model), torch.device("cpu"), torch.float32).describe()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--modes", default=None, help="comma-separated (default: all)")
    parser.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--gen-len", type=int, default=64, help="greedy agreement tokens")
    parser.add_argument("--chat-max-tokens", type=int, default=48)
    parser.add_argument("--llama-perplexity", default=None, help="path of llama-perplexity")
    parser.add_argument("--llama-threads", type=int, default=None)
    parser.add_argument("--llama-timeout-s", type=float, default=900.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    known = modes_table()
    args.mode_names = args.modes.split(",") if args.modes else list(known)
    unknown = [m for m in args.mode_names if m not in known]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; known: {list(known)}")
    if "float32" not in args.mode_names:
        args.mode_names.insert(0, "float32")  # the reference the agreement is measured against
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from shoal.model_source import resolve_model
    from shoal.processing.tokenizer import Tokenizer

    model_path = resolve_model(args.model).path
    text = read_text(args.text)
    tokenizer = Tokenizer.from_model(model_path)
    args.token_ids = tokenizer.encode(text, add_special_tokens=False)
    windows = split_windows(args.token_ids, args.ctx, args.max_windows)
    args.num_windows = len(windows)
    log(f"{len(args.token_ids)} tokens, {len(windows)} windows of {args.ctx}")
    table = modes_table()
    modes = {name: run_mode(name, table[name], windows, args) for name in args.mode_names}
    compare_to_reference(modes, "float32")
    anchor = llama_cpp_anchor(args.llama_perplexity, model_path, text, args.token_ids, args)
    report = {
        "machine": machine(),
        "model": model_path,
        "text": {"name": os.path.basename(args.text), "num_tokens": len(args.token_ids)},
        "ctx": args.ctx,
        "num_windows": len(windows),
        "gen_len": args.gen_len,
        "modes": modes,
        "llama_cpp": anchor,
        "default_mode": default_mode(args.model),
    }
    table_md = markdown(report)
    print(table_md, flush=True)
    for m in modes.values():
        for per_token in ("top1", "nlls"):  # not worth the JSON's size
            m["perplexity"].pop(per_token)
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
