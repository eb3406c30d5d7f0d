"""benchmarks/quality.py's parts on a tiny random checkpoint: its perplexity (through shoal's
prompt logprobs) equals transformers' over the same windows, and its agreement and
llama-perplexity parsing count what they say."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import load_benchmark, make_tiny_hf_checkpoint

quality = load_benchmark("quality")


def test_windows_are_llama_perplexity_chunks() -> None:
    windows = quality.split_windows(list(range(10)), 4, None)
    assert windows == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the remainder is dropped
    assert quality.split_windows(list(range(10)), 4, 1) == [[0, 1, 2, 3]]


def test_perplexity_equals_transformers(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    from shoal import LLM

    checkpoint = make_tiny_hf_checkpoint(str(tmp_path / "tiny"), seed=3)
    text = quality.read_text(quality.DEFAULT_TEXT)[:2000]
    llm = LLM(checkpoint, num_blocks=64, max_num_batched_tokens=48)  # windows in 2 chunks
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    windows = quality.split_windows(ids, 64, 3)
    result = quality.perplexity(llm, windows)
    assert result["num_scored_tokens"] == 3 * 31  # positions 33..63 of each window
    assert result["num_evaluated_tokens"] == 3 * 64
    hf = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    nlls: list[float] = []
    top1: list[int] = []
    with torch.no_grad():
        for window in windows:
            logprobs = hf(torch.tensor([window])).logits[0].log_softmax(-1)
            nlls += [-logprobs[j - 1, window[j]].item() for j in range(33, 64)]
            top1 += logprobs[32:63].argmax(-1).tolist()
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-4)
    assert result["top1"] == top1


def test_greedy_agreement_counts_prefixes() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    candidate = [[1, 2, 3, 4], [5, 9, 7, 8]]
    got = quality.greedy_agreement(reference, candidate)
    assert got["prefixes"] == [4, 1]
    assert got["exact_share"] == 0.5
    assert got["mean_prefix_tokens"] == 2.5 and got["prefix_share"] == 5 / 8
    assert quality.top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    ratio, stderr = quality.paired_ratio([1.0, 2.0, 3.0], [1.1, 2.1, 3.1])
    assert ratio == pytest.approx(math.exp(0.1) - 1) and stderr == pytest.approx(0, abs=1e-7)


def test_llama_perplexity_output_parsed_and_absent_binary_skipped() -> None:
    log = (
        "perplexity: calculating perplexity over 76 chunks, n_ctx=512, batch_size=2048, n_seq=4\n"
        "[1]17.1,[2]18.2,\nFinal estimate: PPL = 19.8765 +/- 0.43210\n"
    )
    got = quality.parse_llama_perplexity(log)
    assert got == {"ppl": 19.8765, "ppl_stderr": 0.4321, "num_windows": 76, "ctx": 512}
    with pytest.raises(ValueError, match="Final estimate"):
        quality.parse_llama_perplexity("error: could not load model")
    args = quality.parse_args(["--modes", "gguf"])
    assert args.mode_names == ["float32", "gguf"]  # float32 is the reference, always run
    skipped = quality.llama_cpp_anchor(None, "m.gguf", "text", [1, 2], args)
    assert skipped["skipped"].startswith("not built")
