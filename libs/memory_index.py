"""The block index in process memory: the router's own replica of the global KV index.

The entries of the Redis layout (libs/prefix_index.py), as dicts:
  holders   key -> tuple of the workers holding the block      (Redis: blk:<key>)
  blocks    worker -> {key: publisher hash}                     (Redis: wblk:<worker>)
  emap      worker -> {publisher hash: key}                     (Redis: emap:<worker>)
Written through `KVEventFeed` (libs/kv_event_feed.py) exactly as the kv-index writes Redis, so both
answer the same overlaps for the same events.

Shapes chosen for the garbage collector: dicts of ints and tuples of strings are not tracked by it,
while a set per block made each full collection of a 256-worker index take ~15 ms (a routing
decision caught behind one waits that long); as tuples, ~1 ms. A block's holders are few (KV-aware
routing keeps a prefix on one or a few workers), so a tuple is also cheap to rebuild.
"""

from __future__ import annotations

from itertools import takewhile

from kvmesh.libs.engine.block_hash import BlockHash
from kvmesh.libs.kv_event_feed import BlockIndex
from kvmesh.schemas.kv_events import EngineHash


class MemoryBlockIndex(BlockIndex):
    def __init__(self, extra_keys: bytes, seed: int) -> None:
        super().__init__(extra_keys, seed)
        self.holders: dict[int, tuple[str, ...]] = {}
        self.blocks: dict[str, dict[int, EngineHash]] = {}
        self.emap: dict[str, dict[EngineHash, int]] = {}

    # -- writes (the KVEventFeed's; async only to share BlockIndex's interface with Redis) ----------
    async def key_of(self, worker: str, engine_hash: EngineHash) -> BlockHash | None:
        emap = self.emap.get(worker)
        key = emap.get(engine_hash) if emap is not None else None
        return None if key is None else BlockHash(key)

    async def add(self, worker: str, blocks: list[tuple[EngineHash, BlockHash]], ts: float) -> None:
        emap = self.emap.setdefault(worker, {})
        held = self.blocks.setdefault(worker, {})
        holders = self.holders
        for engine_hash, key in blocks:
            old = emap.get(engine_hash)
            if old is not None and old != key:  # the publisher reused its hash: forget the old block
                self._drop(worker, old, engine_hash)
            emap[engine_hash] = key
            if key not in held:
                holders[key] = (*holders.get(key, ()), worker)
            held[key] = engine_hash

    async def remove(self, worker: str, engine_hashes: list[EngineHash]) -> None:
        emap = self.emap.get(worker)
        if emap is None:
            return
        for engine_hash in engine_hashes:
            key = emap.pop(engine_hash, None)
            if key is not None:
                self._drop(worker, key, engine_hash)
        if not emap:
            await self.clear_worker(worker)

    async def clear_worker(self, worker: str) -> None:
        self.emap.pop(worker, None)
        for key in self.blocks.pop(worker, {}):
            self._unhold(key, worker)

    def clear(self) -> None:
        self.holders.clear()
        self.blocks.clear()
        self.emap.clear()

    def _drop(self, worker: str, key: int, engine_hash: EngineHash) -> None:
        held = self.blocks.get(worker)
        if held is not None and held.get(key) == engine_hash:  # not if stored again under another hash
            del held[key]
            self._unhold(key, worker)

    def _unhold(self, key: int, worker: str) -> None:
        rest = tuple(w for w in self.holders.get(key, ()) if w != worker)
        if rest:
            self.holders[key] = rest
        else:
            self.holders.pop(key, None)

    # -- reads --------------------------------------------------------------------------------------
    async def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        return self.overlap_now(block_hashes)

    def overlap_now(self, block_hashes: list[int]) -> dict[str, int]:
        """worker -> number of leading blocks of this prompt it holds (workers holding none absent).
        Only holders of the first block can hold a prefix; each one's chain is followed in its own
        block map until its first miss (~2.5 us for 128 blocks)."""
        first = self.holders.get(block_hashes[0]) if block_hashes else None
        if not first:
            return {}
        blocks = self.blocks
        return {w: len(list(takewhile(blocks[w].__contains__, block_hashes))) for w in first}

    async def workers(self) -> set[str]:
        return set(self.blocks)

    def check_integrity(self) -> None:
        """holders, blocks and emap describe the same (worker, block) pairs; nothing empty is kept."""
        pairs = {(w, key) for w, held in self.blocks.items() for key in held}
        assert pairs == {(w, key) for key, ws in self.holders.items() for w in ws}, "holders != blocks"
        assert all(len(set(ws)) == len(ws) > 0 for ws in self.holders.values()), "a holder listed twice"
        for w, held in self.blocks.items():
            emap = self.emap.get(w, {})
            assert held and emap, f"empty maps kept for {w}"
            assert all(emap.get(e) == key for key, e in held.items()), f"{w}: blocks and emap disagree"
            assert set(emap.values()) <= set(held), f"{w}: emap names a block it does not hold"
        assert set(self.emap) == set(self.blocks)
