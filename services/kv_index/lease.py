"""One writer at a time: a lease in Redis decides which kv-index replica applies the KV events.

Every replica answers overlap queries; only the lease holder consumes the JetStream event stream and
writes the index. With one writer the events land in stream order (two replicas replaying the
same stream side by side would re-store blocks the other had already seen removed, and a late
replica's replay would clear workers the others had rebuilt), and Redis takes each write once.

The leader's progress lives beside the index, in the same Redis:
  kvmesh:idx:lease     STRING replica id, expires after the lease time (renewed by its holder)
  kvmesh:idx:progress  HASH  stream -> identity of the stream, seq -> last applied stream sequence
  kvmesh:idx:wseq      HASH  worker -> the next per-worker sequence number expected
A Redis restarted empty loses all three together with the index: the next holder finds no progress
and replays the stream from its start. Progress is written only while the lease is still held
(one script), so a replica that lost the lease (or a Redis wiped under it) cannot record progress
that the rebuilt index does not have.
"""

from __future__ import annotations

from typing import NamedTuple

from redis.asyncio import Redis

LEASE = "kvmesh:idx:lease"
PROGRESS = "kvmesh:idx:progress"
WORKER_SEQ = "kvmesh:idx:wseq"

# 2: still ours (renewed), 1: newly ours (it had expired or vanished), 0: another replica holds it
_HOLD_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 2
end
if owner then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Records one applied batch, only while the caller still holds the lease: 1 recorded, 0 not ours.
_COMMIT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'stream', ARGV[2], 'seq', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[4], ARGV[5]) end
return 1
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Progress(NamedTuple):
    stream: str  # identity of the stream `seq` counts in ('' when nothing was applied yet)
    seq: int  # last applied stream sequence (0: none)
    next_seq: dict[str, int]  # worker -> next per-worker sequence number expected


class Lease:
    """The write lease of one replica (`owner`), `ttl_s` long; the holder renews it well before."""

    def __init__(self, redis: Redis, owner: str, ttl_s: float) -> None:
        self.redis = redis
        self.owner = owner
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._hold = redis.register_script(_HOLD_LUA)
        self._commit = redis.register_script(_COMMIT_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def hold(self) -> int:
        """Take or renew the lease: 2 renewed, 1 newly taken (whatever we held before is gone), 0 held
        by another replica."""
        return int(await self._hold(keys=[LEASE], args=[self.owner, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[LEASE], args=[self.owner])

    async def commit(self, stream: str, seq: int, worker: str = "", next_seq: int = 0) -> bool:
        """Record stream sequence `seq` as applied (and `worker`'s next expected sequence number);
        False when the lease is not ours any more: stop writing."""
        args = [self.owner, stream, seq, worker, next_seq]
        return bool(await self._commit(keys=[LEASE, PROGRESS, WORKER_SEQ], args=args))

    async def progress(self) -> Progress:
        raw = await self.redis.hgetall(PROGRESS)
        wseq = await self.redis.hgetall(WORKER_SEQ)
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Progress(
            stream=fields.get("stream", ""),
            seq=int(fields.get("seq", 0)),
            next_seq={_text(k): int(v) for k, v in wseq.items()},
        )

    async def forget_worker(self, worker: str) -> None:
        await self.redis.hdel(WORKER_SEQ, worker)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
