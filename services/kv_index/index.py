"""The global KV block index in Redis: block key -> the workers holding it.

A `BlockIndex` (libs/kv_event_feed.py): keys are re-derived from the tokens each BlockStored event
carries (the same chained hash the tokenizer computes), so any publisher can feed the index, stock
vLLM included, whatever its own hash; a per-worker map from the publisher's hash to our key serves
removals and parent lookups. The router's `--index local` replica (libs/memory_index.py) is written
by the same code, in memory.

The Redis layout and the longest-prefix query (one Lua script) are in libs/prefix_index.py, the
contract with anyone who reads the index.
"""

from __future__ import annotations

from redis.asyncio import Redis

from kvmesh.libs.engine.block_hash import BlockHash
from kvmesh.libs.kv_event_feed import BlockIndex
from kvmesh.libs.prefix_index import P, PrefixIndexReader
from kvmesh.schemas.kv_events import EngineHash


class KVIndex(BlockIndex):
    def __init__(self, redis: Redis, extra_keys: bytes, seed: int) -> None:
        super().__init__(extra_keys, seed)
        self.redis = redis
        self.reader = PrefixIndexReader(redis)

    async def key_of(self, worker: str, engine_hash: EngineHash) -> BlockHash | None:
        known = await self.redis.hget(f"{P}emap:{worker}", str(engine_hash))
        return None if known is None else BlockHash(int(known))

    async def add(self, worker: str, blocks: list[tuple[EngineHash, BlockHash]], ts: float) -> None:
        emap = f"{P}emap:{worker}"
        pipe = self.redis.pipeline(transaction=False)
        for engine_hash, key in blocks:
            pipe.hset(f"{P}blk:{key}", worker, ts)
            pipe.sadd(f"{P}wblk:{worker}", key)
            pipe.hset(emap, str(engine_hash), key)
        await pipe.execute()

    async def remove(self, worker: str, engine_hashes: list[EngineHash]) -> None:
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
        keys = await self.redis.smembers(f"{P}wblk:{worker}")
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else key
            pipe.hdel(f"{P}blk:{key}", worker)
        pipe.delete(f"{P}wblk:{worker}", f"{P}emap:{worker}")
        await pipe.execute()

    async def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        return await self.reader.overlap(block_hashes)

    async def workers(self) -> set[str]:
        names = set()
        async for key in self.redis.scan_iter(match=f"{P}wblk:*"):
            key = key.decode() if isinstance(key, bytes) else key
            names.add(key.removeprefix(f"{P}wblk:"))
        return names
