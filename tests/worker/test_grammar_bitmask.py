"""`apply_bitmask` (the sampler's grammar mask) equals xgrammar's own kernel, on all rows and
on a subset of them."""

from __future__ import annotations

import torch
import xgrammar as xgr

from shoal.structured.bitmask import apply_bitmask

VOCAB = 49157  # not a multiple of 32: the last word is partly past the vocabulary


def _random_bitmask(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    words = xgr.get_bitmask_shape(rows, VOCAB)[1]
    return torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=generator, dtype=torch.int32)


def test_all_rows_and_a_subset_match_xgrammar() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    bitmask = _random_bitmask(6, 1)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    mine = logits.clone()
    apply_bitmask(mine, bitmask, list(range(6)))
    assert torch.equal(mine, expected)

    rows = [1, 4]
    full = torch.full_like(bitmask, -1)
    full[rows] = bitmask[:2]
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, full)
    mine = logits.clone()
    apply_bitmask(mine, bitmask[:2], rows)
    assert torch.equal(mine, expected)
    assert torch.equal(mine[0], logits[0])  # rows without a grammar untouched


def test_bounded_strings_stay_valid_json() -> None:
    """xgrammar 0.2.9's own rule for a length-bounded string admits raw control characters
    (invalid JSON); shoal's grammar keeps the bound and refuses them."""
    import json

    from shoal.structured.backend import json_schema_grammar

    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}
    text = json.dumps({**schema, "required": ["s"]})
    loose = xgr.Grammar.from_json_schema(text, any_whitespace=False)
    fixed = json_schema_grammar(text)
    accepts = xgr.testing._is_grammar_accept_string
    assert accepts(loose, '{"s": "a\tb"}')  # the upstream bug this works around
    assert not accepts(fixed, '{"s": "a\tb"}') and not accepts(fixed, '{"s": "a\x01"}')
    assert accepts(fixed, '{"s": "abc"}') and not accepts(fixed, '{"s": "abcd"}')
