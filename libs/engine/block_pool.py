"""The KV block pool: ref counts, an O(1) LRU free list, the prefix-cache map and KV event records.

A block is in exactly one state:
- used:   ref_cnt > 0 (held by one or more running requests);
- cached: ref_cnt == 0, has a hash, sits in the free list (evicted lazily, only when reused);
- free:   ref_cnt == 0, no hash, sits in the free list.
Free blocks holding no prefix are reused first (they join the free list's head), then cached ones,
least recently freed first (LRU: they join its tail), so a new allocation never evicts a reusable
prefix while a useless block waits. The pool records KV events; its owner drains them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.libs.engine.block_hash import BlockHash
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # intrusive doubly-linked free list
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class FreeBlockQueue:
    """Doubly-linked list of free blocks with O(1) pop-front, append and removal from the middle."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, "block is not in the free list"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: KVBlock) -> None:
        self._insert_after(self._head, block)

    def _insert_after(self, prev: KVBlock | None, block: KVBlock) -> None:
        assert prev is not None and prev.next_free is not None
        nxt = prev.next_free
        prev.next_free = block
        block.prev_free = prev
        block.next_free = nxt
        nxt.prev_free = block
        self.num_free += 1

    def __iter__(self):
        b = self._head.next_free
        while b is not None and b is not self._tail:
            yield b
            b = b.next_free


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self._events: list[KVEvent] = []

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free or evictable cached)."""
        return self.free_queue.num_free

    def usage(self) -> float:
        return 1.0 - self.free_queue.num_free / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    # -- allocation ------------------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks (evicting cached ones lazily), each with ref_cnt 1."""
        if n > self.free_queue.num_free:
            raise ValueError(f"asked for {n} blocks, {self.free_queue.num_free} free")
        out = []
        removed: list[int] = []
        for _ in range(n):
            b = self.free_queue.popleft()
            if b.block_hash is not None:
                del self.cached[b.block_hash]
                removed.append(b.block_hash)
                b.block_hash = None
            b.ref_cnt = 1
            out.append(b)
        if removed:
            self._events.append(BlockRemoved(block_hashes=removed))
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits (pulling idle ones out of the free list)."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each. Blocks reaching 0 that hold no prefix go to the free list's head
        (reused first: they are worth nothing); cached ones to its tail in the given order (callers
        pass a request's blocks tail-first so its prefix outlives its suffix)."""
        for b in blocks:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, f"block {b.block_id} freed twice"
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    self.free_queue.appendleft(b)
                else:
                    self.free_queue.append(b)

    def cache_full_blocks(
        self,
        blocks: list[KVBlock],
        hashes: list[BlockHash],
        parent: BlockHash | None,
        token_ids: list[int],
        extra_keys: list[tuple | None] | None = None,
    ) -> None:
        """Register newly filled blocks under their hashes and record one BlockStored event
        (`extra_keys`: per block, as BlockStored carries them). A hash already cached by another
        block leaves this block uncached (it is freed as plain); the event still lists it, so that
        its hashes line up with its token ids (the pool holds that hash, through the other block)."""
        if not self.enable_caching or not blocks:
            return
        new = 0
        for b, h in zip(blocks, hashes, strict=True):
            assert b.block_hash is None, f"block {b.block_id} is cached already"
            if h in self.cached:
                continue
            b.block_hash = h
            self.cached[h] = b
            new += 1
        if new:
            self._events.append(
                BlockStored(
                    block_hashes=list(hashes),
                    parent_block_hash=parent,
                    token_ids=token_ids,
                    block_size=self.block_size,
                    extra_keys=extra_keys,
                )
            )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no block is in use."""
        if self.free_queue.num_free != self.num_blocks:
            return False
        for b in self.cached.values():
            b.block_hash = None
        self.cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    # -- events and invariants ---------------------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def check_integrity(self) -> None:
        """free + cached + used == total, and every index agrees with the blocks' own state."""
        in_queue = list(self.free_queue)
        assert len(in_queue) == self.free_queue.num_free, "free list length and counter disagree"
        queued = {b.block_id for b in in_queue}
        assert len(queued) == len(in_queue), "a block is twice in the free list"
        used = [b for b in self.blocks if b.ref_cnt > 0]
        assert all(b.block_id not in queued for b in used), "a used block is in the free list"
        assert all(b.ref_cnt == 0 for b in in_queue), "a free-list block has references"
        cached_idle = sum(1 for b in in_queue if b.block_hash is not None)
        plain_free = len(in_queue) - cached_idle
        assert plain_free + cached_idle + len(used) == self.num_blocks, "blocks lost or duplicated"
        for h, b in self.cached.items():
            assert b.block_hash == h, f"cache map entry {h} points at block with hash {b.block_hash}"
        assert sum(1 for b in self.blocks if b.block_hash is not None) == len(self.cached)
