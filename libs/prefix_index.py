"""The read side of the global KV block index in Redis: which workers hold a prompt's prefix.

The kv-index service (services/kv_index) writes the index from the workers' KV events; this module
is the query both it and, when configured to skip a hop, the router run against Redis. The layout
is the contract between them (prefix `kvmesh:`):
  blk:<key>        HASH worker -> last-stored unix time   (who holds this block)
  wblk:<worker>    SET of keys                            (the worker's blocks)
  emap:<worker>    HASH engine hash -> key                 (the writer's: removals, parents)
where <key> is the block's chained hash (libs/engine/block_hash.py) in decimal. The longest-prefix
query is one Lua script: one round trip however long the prompt.
"""

from __future__ import annotations

from redis.asyncio import Redis

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


class PrefixIndexReader:
    """Longest cached prefix per worker, for a prompt's block hashes."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._overlap = redis.register_script(_OVERLAP_LUA)

    async def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """worker -> number of leading blocks of this prompt it holds (workers holding none absent)."""
        if not block_hashes:
            return {}
        # bytes, not str: redis-py encodes every argument of a 128-key call one by one (~2x slower)
        flat = await self._overlap(keys=[_BLK_KEY % h for h in block_hashes], args=_OVERLAP_ARGS)
        out = {}
        for i in range(0, len(flat), 2):
            w = flat[i].decode() if isinstance(flat[i], bytes) else flat[i]
            out[w] = int(flat[i + 1])
        return out
