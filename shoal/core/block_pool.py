"""The pool of KV blocks: reference counts, free lists, and the prefix-cache hash map."""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

# A block's identity for prefix caching: sha256 over the parent block's hash and this
# block's token ids, so equal hashes mean equal token prefixes (the whole chain).
BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: sha256(parent digest || int64 token ids).

    The parent digest has a fixed length (or is absent for the first block), so the byte
    string is unambiguous; no per-process salt, so hashes are stable across processes.
    """
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVBlock:
    """One block of `block_size` token slots in every layer's KV cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        # Number of request block tables that hold this block.
        self.ref_cnt = 0
        # Set while the block is in the prefix cache (full, computed, registered).
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    """Every KV block, free or in use.

    A free block (ref_cnt 0) sits in exactly one of two places:
    - `_free_uncached`: holds nothing reusable; handed out first.
    - `_free_cached`: still in the prefix cache; an LRU ordered by the time it was freed, the
      least recently freed first. Allocation evicts from its front only when no uncached
      block is left; a prefix-cache hit takes a block out of it again (`touch`).
    `_cached` maps each hash to the one block registered under it (free or in use).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # A stack: pop() hands out block 0 first.
        self._free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by some request (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """The block registered under `block_hash`, or None."""
        return self._cached.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (ref_cnt 1 each), evicting cached ones as needed.

        The caller checks `num_free_blocks` first; asking for more is a bug."""
        assert num_blocks <= self.num_free_blocks, "allocate beyond the free blocks"
        out = []
        for _ in range(num_blocks):
            if self._free_uncached:
                block_id = self._free_uncached.pop()
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                self._evict(self.blocks[block_id])
            self.blocks[block_id].ref_cnt = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to cached blocks (prefix-cache hits), reviving free ones."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free_cached[block_id]
            block.ref_cnt += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero become free.

        Pass them in eviction order: the first freed is the first evicted."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._free_uncached.append(block_id)
                else:
                    self._free_cached[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its hash; False when another block already
        holds that hash (the block then stays unregistered and is simply freed later)."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        return True

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1

    def check_integrity(self, block_tables: Iterable[Sequence[int]]) -> None:
        """Assert every invariant, given every request's block table.

        - each block's ref_cnt equals the number of tables holding it;
        - free blocks have ref_cnt 0 and are listed once; held blocks are not listed free;
        - free + held == total;
        - the hash map and the blocks' hashes agree, and a free cached block is registered.
        """
        holders = Counter(b for table in block_tables for b in table)
        uncached = set(self._free_uncached)
        assert len(uncached) == len(self._free_uncached), "a block is listed free twice"
        assert not uncached & self._free_cached.keys(), "a block is in both free lists"
        free = uncached | self._free_cached.keys()
        num_held = 0
        for block in self.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0), (
                f"{block}: ref_cnt != {holders.get(block.block_id, 0)} holding tables"
            )
            assert (block.block_id in free) == (block.ref_cnt == 0), f"{block}: free list wrong"
            num_held += block.ref_cnt > 0
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id, f"{block}: unmapped"
        assert len(free) + num_held == self.num_blocks, "free + held != total"
        assert set(holders) <= set(range(self.num_blocks)), "a table holds an unknown block id"
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, "hash map disagrees"
        for block_id in uncached:
            assert self.blocks[block_id].block_hash is None, "an uncached free block has a hash"
        for block_id in self._free_cached:
            assert self.blocks[block_id].block_hash is not None, "a cached free block has none"
