"""Per-request KV block tables on top of the block pool: allocation and prefix-cache lookups.

A request's block table lists the blocks holding its tokens in order (docs/engine.md):

    block_size 4, table [7, 2, 5], 10 tokens
    position  0 1 2 3 | 4 5 6 7 | 8 9 . .
    block     7       | 2       | 5            block = table[position // 4]
    slot      28 .. 31| 8 .. 11 | 20 21        slot  = block * 4 + position % 4 (runner)
              full    | full    | partial      only full blocks are prefix-cached
"""

from __future__ import annotations

from collections.abc import Sequence

from shoal.core.block_pool import BlockPool, hash_block_tokens
from shoal.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables of the running requests, and prefix caching of their full blocks.

    Full blocks are registered in the prefix cache once their KV has been computed (after
    the step that computed them, see `cache_full_blocks`), including blocks filled by
    generated tokens, so a later request with the same token prefix reuses them. Blocks
    being computed in the current step are "pending": a request whose prefix continues into
    one waits a step (`has_pending_prefix`) rather than computing the same tokens again.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        # How many leading blocks of each table have been offered to the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        # Hashes of full blocks that this step's scheduled tokens complete.
        self._pending: set[bytes] = set()
        # Prefix-cache counters (tokens) since the last take_prefix_cache_stats().
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (empty for a request holding no blocks)."""
        return self.block_tables.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Prefix-cache hits for a request that holds no blocks: (block ids, num tokens).

        Never covers the whole request: at least its last token is left to compute, so the
        step that computes it yields logits to sample from.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._ensure_block_hashes(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def has_pending_prefix(self, request: Request, num_hit_tokens: int) -> bool:
        """True when the block after the request's hits is being computed this step by
        another request (call after `get_computed_blocks`)."""
        if not self._pending:
            return False  # also when caching is off: nothing is ever pending
        i = num_hit_tokens // self.block_size
        max_blocks = (request.num_tokens - 1) // self.block_size  # as in get_computed_blocks
        return i < max_blocks and request.block_hashes[i] in self._pending

    def begin_step(self) -> None:
        """Forget last step's pending blocks (they are registered or dropped by now)."""
        self._pending.clear()

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not the retries of one that did not fit)."""
        if self.enable_caching:
            self._num_queried_tokens += num_queried_tokens
            self._num_hit_tokens += num_hit_tokens

    def take_prefix_cache_stats(self) -> tuple[int, int]:
        """(queried tokens, hit tokens) since the last call."""
        stats = (self._num_queried_tokens, self._num_hit_tokens)
        self._num_queried_tokens = self._num_hit_tokens = 0
        return stats

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Grow the request's table to hold its computed tokens, `computed_blocks` (hits from
        `get_computed_blocks`, only for a request holding no blocks) and `num_new_tokens`
        more. Returns the newly allocated block ids (hits excluded), or None, changing
        nothing, when too few blocks are free.
        """
        table = self.block_tables.get(request.request_id)
        num_held = len(table) if table is not None else 0
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        if num_tokens <= num_held * self.block_size:
            return []  # the common decode step: the last block has room
        num_needed = max(cdiv(num_tokens, self.block_size) - num_held - len(computed_blocks), 0)
        # Hits on free cached blocks take those blocks out of the free pool too.
        num_revived = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None
        if table is None:
            table = self.block_tables[request.request_id] = []
        if computed_blocks:
            self.pool.touch(computed_blocks)
            table.extend(computed_blocks)
            # Hits are registered already.
            self._num_cached_blocks[request.request_id] = len(computed_blocks)
        new_blocks = self.pool.allocate(num_needed) if num_needed else []
        table.extend(new_blocks)
        if self.enable_caching:
            self._mark_pending(request, num_tokens)
        return new_blocks

    def _mark_pending(self, request: Request, num_tokens: int) -> None:
        start = self._num_cached_blocks.get(request.request_id, 0)
        num_full = num_tokens // self.block_size
        if num_full > start:
            self._ensure_block_hashes(request, num_full)
            self._pending.update(request.block_hashes[start:num_full])

    def num_cached_blocks_of(self, request_id: str) -> int:
        """Leading blocks of the request's table already offered to the prefix cache."""
        return self._num_cached_blocks.get(request_id, 0)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is computed (`num_computed_tokens`)."""
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._ensure_block_hashes(request, num_full)
        table = self.block_tables[request.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(table[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks (last block first, so tails are evicted first)."""
        table = self.block_tables.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def _ensure_block_hashes(self, request: Request, num_blocks: int) -> None:
        """Extend the request's hash chain to cover its first `num_blocks` full blocks."""
        hashes = request.block_hashes
        tokens = request.all_token_ids
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else request.cache_salt
            hashes.append(hash_block_tokens(parent, tokens[i * size : (i + 1) * size]))

    def check_integrity(self, requests: dict[str, Request] | None = None) -> None:
        """Assert the pool's invariants, and with `requests` that each table is consistent
        with its request (no repeated block; registered blocks carry the request's hash)."""
        self.pool.check_integrity(self.block_tables.values())
        assert self._num_cached_blocks.keys() <= self.block_tables.keys()
        for request_id, table in self.block_tables.items():
            assert len(set(table)) == len(table), f"{request_id}: a block repeats in its table"
            num_cached = self._num_cached_blocks.get(request_id, 0)
            assert num_cached <= len(table)
            if requests is None:
                continue
            request = requests[request_id]
            assert len(table) * self.block_size >= request.num_computed_tokens
            for i in range(num_cached):
                block_hash = self.pool.blocks[table[i]].block_hash
                assert block_hash is None or block_hash == request.block_hashes[i], (
                    f"{request_id}: block {table[i]} cached under another prefix"
                )
