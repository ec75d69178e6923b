"""kv-index service: JetStream KV events -> the Redis block index; answers prefix-overlap queries.

Replicas: every replica answers overlap queries (queue group `kv-index`); one at a time, the holder
of the Redis write lease (lease.py), consumes the event stream and writes the index, resuming from
the stream sequence its predecessor recorded. If the leader dies its lease expires and another
replica takes over where it stopped.

Faults it rides out:
- Redis restarted empty: the lease and the recorded progress vanish with the index, so the next
  lease holder replays the stream from its start and the index is rebuilt; meanwhile overlap queries
  fail (ErrorReply "unavailable") and the router routes by load.
- Redis unreachable for a while: the leader stops consuming at the first failed write and resumes
  from its last recorded batch once Redis answers; no event is skipped.
- NATS restarted: JetStream push consumers do not survive it (nats-py's ordered consumer does not
  come back either), so after every reconnect the leader re-creates the stream if the server lost
  it and subscribes again from its recorded progress.
- A worker's sequence gap (events lost, or aged out of the stream) drops that worker's entries: they
  may be wrong; its next events rebuild them. Duplicates (a publish retried after a lost ack) are
  skipped.
- Workers whose heartbeats stop are removed; a worker known only from its events (replayed after
  its death, or found in Redis by a new leader) is removed after `silent_worker_s` without a beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from kvmesh.libs.bus import Bus
from kvmesh.libs.kv_contract import ContractGate
from kvmesh.libs.kv_event_feed import BatchOutcome, KVEventFeed
from kvmesh.libs.kv_event_stream import (
    ReconnectWatch,
    StreamReader,
    batch_contract,
    batch_origin,
    ensure_stream,
    every,
    stream_info,
)
from kvmesh.schemas.messages import ErrorReply, Heartbeat, KVContract, OverlapReply, OverlapRequest, Subjects
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.kv_index.lease import Lease

log = logging.getLogger(__name__)

LEADER = Gauge("kvmesh:kv_index_leader", "1 while this replica holds the write lease and applies KV events.")
REBUILDS = Counter(
    "kvmesh:kv_index_rebuilds",
    "Replays of the KV event stream from its start into an index with no progress.",
)
RESYNCS = Counter("kvmesh:kv_index_resyncs", "Workers dropped for a gap in their KV event sequence numbers.")


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class KVIndexConfig:
    nats_url: str
    redis_url: str
    model: str
    replica_id: str = ""  # '' : hostname-pid-random
    lease_s: float = 3.0  # a dead leader is replaced after at most this long
    silent_worker_s: float = 10.0  # a worker known only from events is dropped after this long


class KVIndexService:
    def __init__(
        self,
        index: KVIndex,
        replica_id: str = "",
        lease_s: float = 3.0,
        silent_worker_s: float = 10.0,
        gate: ContractGate | None = None,
    ) -> None:
        self.index = index
        self.replica_id = replica_id or default_replica_id()
        self.lease = Lease(index.redis, self.replica_id, lease_s)
        self.tick_s = lease_s / 4  # renew well before the lease runs out
        # per-worker sequence checks and liveness, shared with the router's local replica
        self.feed = KVEventFeed(index, silent_worker_s, gate)
        self.rebuilds = 0  # replays from the stream's start into an index with no recorded progress
        self._leader = False
        self.applied_seq = 0  # last stream sequence applied (while leader)
        self.bus: Bus | None = None
        self._stream_id = ""
        self.reader = StreamReader(self._on_message)  # one batch applied at a time, in stream order
        self._restart = False  # consumption must resume from the recorded progress
        self.watch: ReconnectWatch | None = None
        self._task: asyncio.Task | None = None

    @property
    def resyncs(self) -> int:
        return self.feed.resyncs

    @property
    def is_leader(self) -> bool:
        return self._leader

    @is_leader.setter
    def is_leader(self, value: bool) -> None:
        self._leader = value
        LEADER.set(int(value))

    # -- events ------------------------------------------------------------------------------------
    async def on_batch(
        self, worker: str, seq: int, data: bytes, contract: KVContract | None = None
    ) -> BatchOutcome:
        outcome = await self.feed.on_batch(worker, seq, data, contract)
        if outcome == "resynced":
            RESYNCS.inc()
        return outcome

    async def _on_message(self, msg) -> None:
        """One stream message, while leader: apply it, then record it as applied under the lease."""
        sseq = msg.metadata.sequence.stream
        if sseq <= self.applied_seq:
            return
        worker, seq = batch_origin(msg)
        try:
            if seq is not None:
                try:
                    await self.on_batch(worker, seq, msg.data, batch_contract(msg))
                except (RedisError, OSError):
                    raise
                except Exception:  # a bug, not a fault: skip the batch rather than stall the index
                    log.exception("applying KV events of %s failed: skipped them", worker)
            nxt = self.feed.next_seq.get(worker) if seq is not None else None
            ours = await self.lease.commit(self._stream_id, sseq, worker if nxt is not None else "", nxt or 0)
        except (RedisError, OSError) as exc:
            log.warning(
                "applying stream message %d failed (%r): resuming there once Redis answers",
                sseq,
                exc,
            )
            self.reader.drop()
            self._restart = True
            return
        if not ours:
            log.warning("%s: lost the write lease: stopped applying events", self.replica_id)
            self.reader.drop()
            self.is_leader = False
            return
        self.applied_seq = sseq

    # -- leadership ----------------------------------------------------------------------------------
    async def tick(self) -> None:
        """Hold the lease; (re)start consuming where the progress says when needed; expire workers."""
        assert self.bus is not None and self.watch is not None
        if self.watch.reconnected():  # NATS came back: its push consumers are gone
            self.feed.forgive_silence()
            await ensure_stream(self.bus)  # re-created if the server lost it
            self._restart = True
        held = await self.lease.hold()
        if held == 0:
            if self.is_leader or self.reader.active:
                log.info("%s: another replica holds the write lease: standing by", self.replica_id)
                await self._stop_consuming()
            self.is_leader = False
            return
        new_term = held == 1 or not self.is_leader
        if new_term or self._restart or not self.reader.active:
            await self._start_consuming(new_term)
        # Silence heard through a broken connection proves nothing (a reconnect since the top of this
        # round is handled at the next one).
        if self.watch.steady:
            await self.expire()

    async def _start_consuming(self, new_term: bool) -> None:
        assert self.bus is not None
        await self._stop_consuming()
        stream_id, info = await stream_info(self.bus)
        progress = await self.lease.progress()
        if not progress.stream:
            if info.state.last_seq:
                self.rebuilds += 1
                REBUILDS.inc()
                log.warning(
                    "%s: the index has no recorded progress (new or restarted Redis): rebuilding "
                    "it from the event stream's start",
                    self.replica_id,
                )
            applied = 0
        elif progress.stream != stream_id:
            log.warning(
                "%s: the event stream was re-created: reading the new one from its start", self.replica_id
            )
            applied = 0
        else:
            applied = progress.seq
        if applied + 1 < info.state.first_seq:
            log.warning(
                "stream messages %d..%d aged out before they were applied: per-worker gaps resync "
                "those workers",
                applied + 1,
                info.state.first_seq - 1,
            )
        self._stream_id = stream_id
        self.applied_seq = applied
        self.feed.next_seq = dict(progress.next_seq)
        if not new_term:
            log.info("%s: consuming again after stream sequence %d", self.replica_id, applied)
        else:
            log.info(
                "%s: holds the write lease: applying events after stream sequence %d",
                self.replica_id,
                applied,
            )
            for worker in await self.index.workers():  # indexed under a previous leader: beating?
                self.feed.expect(worker)
        await self.reader.start(self.bus, applied)
        self.is_leader = True
        self._restart = False

    async def _stop_consuming(self) -> None:
        await self.reader.stop()  # waits for a batch in progress to be recorded

    async def _stopped_by_failure(self) -> None:
        if self.reader.active:
            await self._stop_consuming()
            self._restart = True

    # -- workers -------------------------------------------------------------------------------------
    async def expire(self) -> list[str]:
        """Remove the workers that stopped beating from the index and from the recorded progress."""
        return await self.feed.expire(then=self.lease.forget_worker)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def attach(self, bus: Bus) -> None:
        """Serve heartbeats and overlap queries, take the write lease if nobody holds it, and keep
        supervising (lease, consumer, expiry) in the background until `close()`."""
        self.bus = bus
        self.watch = ReconnectWatch(bus)
        await ensure_stream(bus)

        async def on_beat(hb: Heartbeat, _raw) -> None:
            self.feed.beat(hb.stats.worker_id, hb.interval_s)

        async def on_overlap(req: OverlapRequest, _raw) -> OverlapReply | ErrorReply:
            try:
                return OverlapReply(overlap=await self.index.overlap(req.block_hashes))
            except (RedisError, OSError) as exc:
                return ErrorReply(code="unavailable", message=f"the index's Redis is unreachable: {exc!r}")

        await bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat)
        await bus.serve(Subjects.KV_INDEX_OVERLAP, OverlapRequest, on_overlap, queue="kv-index")
        try:
            await self.tick()
        except Exception as exc:
            log.warning("%s: not leading yet: %r", self.replica_id, exc)
        what = f"{self.replica_id}: leading the index (stopped writing)"
        self._task = asyncio.create_task(every(self.tick_s, self.tick, what, self._stopped_by_failure))

    async def close(self) -> None:
        """Stop consuming and hand the lease over at once (the next replica need not wait it out)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_consuming()
        if self.is_leader:
            with contextlib.suppress(Exception):
                await self.lease.release()
        self.is_leader = False
