"""Reference outputs from transformers' greedy `generate`, and exact comparisons with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from shoal.processing.outputs import RequestOutput
from shoal.processing.tokenizer import Tokenizer


@dataclass
class HFResult:
    token_ids: list[int]
    # Per generated position: {token_id: logprob} of the top tokens (when asked for).
    top_logprobs: list[dict[int, float]] | None = None


def hf_greedy(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    num_logprobs: int = 0,
) -> list[HFResult]:
    """Each prompt alone through `model.generate` (no padding), greedy, stopping at EOS.

    Runs on one torch thread: on small shared CPUs (CI) two threads were ~3x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [
            _greedy_one(model, ids, max_new_tokens, eos_token_id, num_logprobs) for ids in prompts
        ]
    finally:
        torch.set_num_threads(threads)


def _greedy_one(
    model: Any, ids: list[int], max_new_tokens: int, eos_token_id: int, num_logprobs: int
) -> HFResult:
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            return_dict_in_generate=True,
            output_logits=bool(num_logprobs),
        )
    top = None
    if num_logprobs:
        top = []
        for logits in out.logits:
            values, indices = logits[0].float().log_softmax(-1).topk(num_logprobs)
            top.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
    return HFResult(out.sequences[0, len(ids) :].tolist(), top)


def assert_same_tokens(
    label: str, ours: list[RequestOutput], refs: list[HFResult], tokenizer: Tokenizer
) -> None:
    """Every prompt's generated ids equal transformers'; on failure name each prompt, the
    first differing position and the text up to it."""
    assert len(ours) == len(refs)
    problems = []
    for i, (out, ref) in enumerate(zip(ours, refs, strict=True)):
        got = out.outputs[0].token_ids
        if got == ref.token_ids:
            continue
        k = next(
            (j for j, (a, b) in enumerate(zip(got, ref.token_ids, strict=False)) if a != b),
            min(len(got), len(ref.token_ids)),
        )
        problems.append(
            f"prompt {i}: differs at generated token {k} (ours {len(got)} tokens, HF "
            f"{len(ref.token_ids)}): ours {got[k : k + 4]} vs HF {ref.token_ids[k : k + 4]} after "
            f"{tokenizer.decode(got[:k], skip_special_tokens=False)[-60:]!r}"
        )
    if problems:
        pytest.fail(
            f"{label}: {len(problems)} of {len(refs)} prompts differ from "
            "transformers:\n" + "\n".join(problems)
        )
