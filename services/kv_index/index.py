"""The global KV block index in Redis: block key -> the workers holding it.

Keys are re-derived from the tokens each BlockStored event carries (the same chained hash the
tokenizer computes), so any publisher can feed the index, stock vLLM included, whatever its own
hash; a per-worker map from the publisher's hash to our key serves removals and parent lookups.

Redis layout (prefix `kvmesh:`):
  blk:<key>        HASH worker -> last-stored unix time   (who holds this block)
  wblk:<worker>    SET of keys                            (cleanup when a worker leaves)
  emap:<worker>    HASH engine hash -> key                 (removals, parents)
The longest-prefix query runs as one Lua script: one round trip however long the prompt (see
_OVERLAP_LUA for how it stays cheap with long prompts).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from kvmesh.libs.engine.block_hash import BlockHash, hash_block, root_hash
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

P = "kvmesh:"

# KEYS: block keys of a prompt in order; ARGV: [max holders for the fast path, worker-set key prefix,
# block-key prefix]. Returns [worker, n, worker, n, ...]: for each worker the number of leading blocks
# it holds. Only holders of the first block can hold a prefix. When they are few (KV-aware routing
# keeps a prefix on one or a few workers), each one's whole chain is checked with one SMISMEMBER on
# its block set: 1 + holders calls instead of one HKEYS per block (a 128-block prompt cost ~4x more
# in the script). Many holders: walk the chain, narrowing the set of workers still matching.
_OVERLAP_LUA = """
local first = redis.call('HKEYS', KEYS[1])
local flat = {}
if #first == 0 then return flat end
local n = #KEYS
if #first <= tonumber(ARGV[1]) then
  local members = {}
  local skip = string.len(ARGV[3]) + 1
  for i, key in ipairs(KEYS) do members[i] = string.sub(key, skip) end
  for _, w in ipairs(first) do
    local held = redis.call('SMISMEMBER', ARGV[2] .. w, unpack(members))
    local k = 0
    while k < n and held[k + 1] == 1 do k = k + 1 end
    if k > 0 then table.insert(flat, w); table.insert(flat, k) end
  end
  return flat
end
local result = {}
local alive = {}
for _, w in ipairs(first) do alive[w] = true; result[w] = 1 end
for i = 2, n do
  local holders = redis.call('HKEYS', KEYS[i])
  local now = {}
  local any = false
  for _, w in ipairs(holders) do
    if alive[w] then now[w] = true; result[w] = i; any = true end
  end
  if not any then break end
  alive = now
end
for w, k in pairs(result) do table.insert(flat, w); table.insert(flat, k) end
return flat
"""
FAST_PATH_HOLDERS = 8
_OVERLAP_ARGS = [FAST_PATH_HOLDERS, f"{P}wblk:".encode(), f"{P}blk:".encode()]
_BLK_KEY = f"{P}blk:%d".encode()


class KVIndex:
    def __init__(self, redis: Redis, extra_keys: bytes, seed: int) -> None:
        self.redis = redis
        self.extra_keys = extra_keys
        self.seed = seed
        self._overlap = redis.register_script(_OVERLAP_LUA)

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
        if not block_hashes:
            return {}
        # bytes, not str: redis-py encodes every argument of a 128-key call one by one (~2x slower)
        flat = await self._overlap(keys=[_BLK_KEY % h for h in block_hashes], args=_OVERLAP_ARGS)
        out = {}
        for i in range(0, len(flat), 2):
            w = flat[i].decode() if isinstance(flat[i], bytes) else flat[i]
            out[w] = int(flat[i + 1])
        return out

    async def workers(self) -> set[str]:
        names = set()
        async for key in self.redis.scan_iter(match=f"{P}wblk:*"):
            key = key.decode() if isinstance(key, bytes) else key
            names.add(key.removeprefix(f"{P}wblk:"))
        return names
