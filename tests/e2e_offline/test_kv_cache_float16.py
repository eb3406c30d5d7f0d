"""`LLM(kv_cache_dtype="float16")`: keys and values stored in half precision. A request's
greedy tokens still do not depend on the rest of the batch, with chunked prefill (the prefill
attends to the same rounded keys a later chunk or decode step reads back), in float32 and in
int8 mode."""

from __future__ import annotations

import random

import pytest

from shoal import LLM
from tests.e2e_offline.test_int8 import _assert_batch_invariant
from tests.helpers import make_tiny_model_dir


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_tiny_model_float16_kv_batch_invariant_with_chunked_prefill(tmp_path, quantization) -> None:
    path = make_tiny_model_dir(str(tmp_path / "tiny"))
    llm = LLM(
        path, load_format="dummy", quantization=quantization, num_blocks=256,
        max_num_batched_tokens=24, max_num_seqs=16, enable_prefix_caching=False,
        kv_cache_dtype="float16",
    )  # fmt: skip
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(5, 60))] for _ in range(16)]
    _assert_batch_invariant(llm, prompts, alone=list(range(1, 16, 3)))
