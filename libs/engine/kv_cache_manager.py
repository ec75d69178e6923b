"""Request-level view of the block pool: prefix-cache lookups, slot allocation, caching, freeing.

The scheduler only sees requests and block counts; the pool's internals stay behind this class.
"""

from __future__ import annotations

from kvmesh.libs.engine.block_pool import BlockPool, KVBlock
from kvmesh.libs.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size

    def get_computed_blocks(self, req: Request) -> list[KVBlock]:
        """Longest run of the request's leading full blocks already in the prefix cache.
        At least one token is always left to compute: its logits give the next token."""
        if not self.pool.enable_caching or req.num_computed_tokens:
            return []
        hashes = req.update_block_hashes(self.block_size)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request could ever hold: the whole pool."""
        return self.pool.num_blocks * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int, hits: list[KVBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens (after any prefix `hits`). False if the pool
        cannot, in which case nothing changed."""
        hits = hits or []
        num_tokens = req.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_new_blocks = cdiv(num_tokens, self.block_size) - len(req.blocks) - len(hits)
        idle_hits = sum(1 for b in hits if b.ref_cnt == 0)  # touching them takes them off the free list
        if num_new_blocks > self.pool.num_free_blocks - idle_hits:
            return False
        if hits:
            self.pool.touch(hits)
            req.blocks.extend(hits)
            req.num_cached_blocks = len(req.blocks)
        if num_new_blocks > 0:
            req.blocks.extend(self.pool.get_new_blocks(num_new_blocks))
        return True

    def cache_blocks(self, req: Request) -> None:
        """Register the request's blocks that became full of computed tokens."""
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= req.num_cached_blocks:
            return
        hashes = req.update_block_hashes(self.block_size)
        first = req.num_cached_blocks
        # a salted prompt's first block says its salt: an index re-derives that block's key with it
        salted = first == 0 and req.cache_salt
        self.pool.cache_full_blocks(
            req.blocks[first:num_full],
            hashes[first:num_full],
            parent=hashes[first - 1] if first else None,
            token_ids=req.token_ids[first * self.block_size : num_full * self.block_size],
            extra_keys=[(req.cache_salt,), *[None] * (num_full - 1)] if salted else None,
        )
        req.num_cached_blocks = num_full

    def free(self, req: Request) -> None:
        """Release every block of the request, tail first (its prefix stays cached longest)."""
        self.pool.free_blocks(req.blocks[::-1])
        req.blocks = []
        req.num_cached_blocks = 0
