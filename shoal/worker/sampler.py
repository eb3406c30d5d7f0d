"""Batched sampling: greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs.

Contract (per row of the logits, i.e. per request sampled this step):
1. Logprobs, when asked for, come from the raw logits (log_softmax before any masking or
   temperature, like vLLM's default): the sampled token's logprob, its 1-based rank
   (1 + the number of tokens with a strictly larger logprob) and the top-`k` alternatives.
2. Logits controls (penalties, logit bias, allowed token ids, bad words; penalties.py) on
   the rows that set them, then banned tokens (EOS and stop tokens while a request has
   fewer than `min_tokens` outputs) get -inf, then every token a row's grammar forbids
   (structured outputs; shoal/structured/).
3. Greedy (temperature < 1e-5): exactly `argmax` of the logits, first index on ties. (A
   step whose every row is greedy without logprobs or banned tokens never reaches this
   module on float32 CPU: the runner takes the native greedy LM head's argmax, the same rule
   on logits summed in another order; `ModelRunner.execute_model`.)
4. Otherwise logits / temperature, then min-p (drop tokens whose probability is below
   `min_p` times the top one's), top-k (keep the k largest, ties with the k-th kept), top-p
   (keep the smallest set of most likely tokens whose mass reaches `top_p`), then one draw
   by inverse CDF: a uniform u in [0, 1) and the first token whose cumulative probability
   (summed in float64, so a token down to ~1e-16 of the mass keeps its chance) exceeds u
   times the total. A filtered token has no mass and is never drawn.
5. A seeded request draws its u from its own `torch.Generator`, exactly one float64 per
   sampled token (`skip_draws` replays them), so its tokens do not depend on the rest of the batch or
   on its row, and a resumed request skips as many draws as it has outputs.

The draw was an exponential race (argmax of probs / E, E ~ Exp(1) per token) until torch's
`exponential_` proved to cost ~20 ns per value on CPU: ~1 ms per sampled row of the default
model's 49,152-token vocabulary, 69 ms of a 64-row step; the inverse CDF takes ~0.1 ms per row
(docs/engine-runner.md, "Sampling contract").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shoal.worker.penalties import LogitsControls

_GREEDY_EPS = 1e-5


@dataclass
class SamplingBatch:
    """Per-row settings of one step's sampled requests (row i = logits row i)."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]  # 1.0 = off
    min_p: list[float]  # 0.0 = off
    # Per row: its generator, or None for the runner's shared one.
    generators: list[torch.Generator | None]
    # Per row: how many top alternatives to return, or None for no logprobs at all.
    num_logprobs: list[int | None]
    # (row, token id) pairs to forbid this step.
    banned: list[tuple[int, int]] = field(default_factory=list)
    # Penalties, logit bias, allowed ids, bad words of the rows that set them (penalties.py).
    controls: LogitsControls | None = None
    # Structured outputs: (rows, their [len(rows), ceil(vocab / 32)] int32 bitmask of allowed
    # tokens); every other token of those rows gets -inf.
    grammar: tuple[list[int], torch.Tensor] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.temperature)


# (token_id, logprob, rank, top ids, top logprobs), as ModelRunnerOutput.logprobs holds.
TokenLogprobs = tuple[int, float, int, list[int], list[float]]


def sample(
    logits: torch.Tensor, batch: SamplingBatch, shared_generator: torch.Generator
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample one token per row of `logits` ([num_rows, vocab] float32; modified in place).

    Returns the token ids and, per row, its logprobs entry (None when not requested)."""
    raw_logprobs = _raw_logprobs(logits, batch)
    if batch.controls is not None:
        batch.controls.apply(logits)
    if batch.banned:
        rows, cols = zip(*batch.banned, strict=True)
        logits[list(rows), list(cols)] = float("-inf")
    if batch.grammar is not None:
        from shoal.structured.bitmask import apply_bitmask

        apply_bitmask(logits, batch.grammar[1], batch.grammar[0])
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, t in enumerate(batch.temperature) if t >= _GREEDY_EPS]
    if random_rows:
        picked = _sample_random(logits, random_rows, batch, shared_generator)
        token_ids[random_rows] = picked
    ids = token_ids.tolist()
    return ids, _logprob_entries(raw_logprobs, token_ids, ids, batch)


def _sample_random(
    logits: torch.Tensor, rows: list[int], batch: SamplingBatch, shared: torch.Generator
) -> torch.Tensor:
    device = logits.device
    sub = logits if len(rows) == logits.shape[0] else logits[rows]
    temps = torch.tensor([batch.temperature[i] for i in rows], device=device)
    sub = sub.div_(temps.unsqueeze(1)) if sub is logits else sub / temps.unsqueeze(1)
    min_p = [batch.min_p[i] for i in rows]
    if any(p > 0.0 for p in min_p):
        _apply_min_p(sub, torch.tensor(min_p, device=device))
    top_k = [batch.top_k[i] for i in rows]
    top_p = [batch.top_p[i] for i in rows]
    if any(p < 1.0 for p in top_p):
        _apply_top_k_top_p(sub, top_k, top_p)
    elif any(k > 0 for k in top_k):
        _apply_top_k(sub, top_k)
    probs = sub.softmax(dim=-1)
    generators = [batch.generators[i] for i in rows]
    u = draw_uniforms(generators, shared, device)
    return inverse_cdf(probs, u)


def draw_uniforms(
    generators: list[torch.Generator | None], shared: torch.Generator, device: torch.device
) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row: from the row's own generator, or (in row order)
    from the shared one."""
    u = torch.empty(len(generators), dtype=torch.float64, device=device)
    for j, gen in enumerate(generators):
        u[j : j + 1].uniform_(generator=shared if gen is None else gen)
    return u


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` [rows, vocab] (unnormalised is fine), the first token whose
    cumulative probability exceeds u times the row's total: a draw from the row's
    distribution. The target stays strictly below the total, so the token found always has
    mass (its cumulative sum rises past the target)."""
    cdf = probs.to(torch.float64).cumsum_(dim=-1)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)


def skip_draws(generator: torch.Generator, tokens: int, device: torch.device) -> None:
    """Advance a seeded request's generator past the draws of `tokens` sampled tokens, one
    call of one value each as `draw_uniforms` makes them (on CUDA one call of n values
    advances it differently): a resumed request continues its random stream."""
    scratch = torch.empty(1, dtype=torch.float64, device=device)
    for _ in range(tokens):
        scratch.uniform_(generator=generator)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)  (same softmax denominator).
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    logits.masked_fill_(logits < threshold, float("-inf"))


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    values = logits.topk(max(ks), dim=-1).values  # [rows, max_k], descending
    kth = values.gather(1, torch.tensor(ks, device=logits.device).unsqueeze(1) - 1)
    logits.masked_fill_(logits < kth, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """Both filters over one ascending sort (the expensive part, done once)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)
    if any(k > 0 for k in top_k):
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        kth = sorted_logits.gather(1, (vocab - ks).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens less likely than it, itself included, carry at most
    # 1 - top_p of the mass; the most likely token always stays.
    p = torch.tensor(top_p, device=logits.device).unsqueeze(1)
    drop = cum <= 1 - p
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, order, sorted_logits)


def _raw_logprobs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor | None:
    rows = [i for i, n in enumerate(batch.num_logprobs) if n is not None]
    if not rows:
        return None
    sub = logits if len(rows) == logits.shape[0] else logits[rows]
    return sub.log_softmax(dim=-1)  # a new tensor: later in-place masking does not touch it


def _logprob_entries(
    logprobs: torch.Tensor | None, token_ids: torch.Tensor, ids: list[int], batch: SamplingBatch
) -> list[TokenLogprobs | None]:
    entries: list[TokenLogprobs | None] = [None] * batch.num_rows
    if logprobs is None:
        return entries
    rows = [i for i, n in enumerate(batch.num_logprobs) if n is not None]
    chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1))  # [rows, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    max_k = max(batch.num_logprobs[i] or 0 for i in rows)
    top_values, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (chosen[:, :0], None)
    chosen_l, ranks_l, values_l = chosen.squeeze(1).tolist(), ranks.tolist(), top_values.tolist()
    ids_l = top_ids.tolist() if top_ids is not None else [[] for _ in rows]
    for j, i in enumerate(rows):
        k = batch.num_logprobs[i] or 0
        entries[i] = (ids[i], chosen_l[j], ranks_l[j], ids_l[j][:k], values_l[j][:k])
    return entries
