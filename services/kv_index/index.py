"""The global KV block index in Redis: block key -> the workers holding it.

Keys are re-derived from the tokens each BlockStored event carries (the same chained hash the
tokenizer computes), so any publisher can feed the index, stock vLLM included, whatever its own
hash; a per-worker map from the publisher's hash to our key serves removals and parent lookups.

The Redis layout and the longest-prefix query (one Lua script) are in libs/prefix_index.py, the
contract with anyone who reads the index.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from kvmesh.libs.engine.block_hash import BlockHash, hash_block, root_hash
from kvmesh.libs.prefix_index import P, PrefixIndexReader
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch


class KVIndex:
    def __init__(self, redis: Redis, extra_keys: bytes, seed: int) -> None:
        self.redis = redis
        self.extra_keys = extra_keys
        self.seed = seed
        self.reader = PrefixIndexReader(redis)

    async def apply(self, worker: str, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                await self._stored(worker, event, batch.ts)
            elif isinstance(event, BlockRemoved):
                await self._removed(worker, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                await self.clear_worker(worker)

    async def _stored(self, worker: str, ev: BlockStored, ts: float) -> None:
        emap = f"{P}emap:{worker}"
        if ev.parent_block_hash is None:
            parent = root_hash(self.seed)
        else:
            known = await self.redis.hget(emap, str(ev.parent_block_hash))
            if known is None:
                return  # the parent was never indexed (evicted meanwhile): the chain is unusable
            parent = BlockHash(int(known))
        bs = ev.block_size
        pipe = self.redis.pipeline(transaction=False)
        for i, engine_hash in enumerate(ev.block_hashes):
            tokens = ev.token_ids[i * bs : (i + 1) * bs]
            if len(tokens) < bs:
                break
            parent = hash_block(parent, tokens, self.extra_keys, self.seed)
            pipe.hset(f"{P}blk:{parent}", worker, ts or time.time())
            pipe.sadd(f"{P}wblk:{worker}", parent)
            pipe.hset(emap, str(engine_hash), parent)
        await pipe.execute()

    async def _removed(self, worker: str, engine_hashes: list[int]) -> None:
        emap = f"{P}emap:{worker}"
        keys = await self.redis.hmget(emap, [str(h) for h in engine_hashes])
        pipe = self.redis.pipeline(transaction=False)
        for engine_hash, key in zip(engine_hashes, keys, strict=True):
            if key is None:
                continue
            key = key.decode() if isinstance(key, bytes) else key
            pipe.hdel(f"{P}blk:{key}", worker)
            pipe.srem(f"{P}wblk:{worker}", key)
            pipe.hdel(emap, str(engine_hash))
        await pipe.execute()

    async def clear_worker(self, worker: str) -> None:
        """Forget everything a worker holds (it cleared its cache, restarted, or died)."""
        keys = await self.redis.smembers(f"{P}wblk:{worker}")
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else key
            pipe.hdel(f"{P}blk:{key}", worker)
        pipe.delete(f"{P}wblk:{worker}", f"{P}emap:{worker}")
        await pipe.execute()

    async def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """worker -> number of leading blocks of this prompt it holds."""
        return await self.reader.overlap(block_hashes)

    async def workers(self) -> set[str]:
        names = set()
        async for key in self.redis.scan_iter(match=f"{P}wblk:*"):
            key = key.decode() if isinstance(key, bytes) else key
            names.add(key.removeprefix(f"{P}wblk:"))
        return names
