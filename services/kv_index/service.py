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
import functools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from kvmesh.libs.bus import Bus, decode
from kvmesh.schemas.kv_events import KVEventBatch
from kvmesh.schemas.messages import ErrorReply, Heartbeat, OverlapReply, OverlapRequest, Subjects
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.kv_index.lease import Lease
from kvmesh.services.worker.kv_events import SEQ_HEADER, STREAM, WORKER_HEADER, ensure_stream

log = logging.getLogger(__name__)
MISSED_BEATS = 3

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
    ) -> None:
        self.index = index
        self.replica_id = replica_id or default_replica_id()
        self.lease = Lease(index.redis, self.replica_id, lease_s)
        self.tick_s = lease_s / 4  # renew well before the lease runs out
        self.silent_worker_s = silent_worker_s
        self.next_seq: dict[str, int] = {}
        self.last_beat: dict[str, tuple[float, float]] = {}  # worker -> (monotonic time, interval)
        self.resyncs = 0
        self.rebuilds = 0  # replays from the stream's start into an index with no recorded progress
        self._leader = False
        self.applied_seq = 0  # last stream sequence applied (while leader)
        self.bus: Bus | None = None
        self._stream_id = ""
        self._sub = None  # the JetStream subscription, while consuming
        self._term = 0  # bumped whenever consumption stops: late messages of an old term are ignored
        self._lock = asyncio.Lock()  # one batch applied at a time, in stream order
        self._restart = False  # consumption must resume from the recorded progress
        self._reconnects = 0
        self._task: asyncio.Task | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader

    @is_leader.setter
    def is_leader(self, value: bool) -> None:
        self._leader = value
        LEADER.set(int(value))

    # -- events ------------------------------------------------------------------------------------
    async def on_batch(self, worker: str, seq: int, data: bytes) -> None:
        try:
            batch = decode(data, KVEventBatch)
        except msgspec.DecodeError as exc:
            log.warning("dropped a malformed KV event batch from %s: %s", worker, exc)
            return
        if worker not in self.last_beat:  # no heartbeat heard (yet): expire it unless one comes
            self.last_beat[worker] = (time.monotonic(), self.silent_worker_s / MISSED_BEATS)
        expected = self.next_seq.get(worker)
        if seq != 0 and expected is not None and seq != expected:
            if seq < expected:  # published twice (a retry after a lost ack): applied already
                log.debug("skipped a repeated KV event batch %d of %s", seq, worker)
                return
            log.warning("KV events of %s jumped from %d to %d: resyncing it", worker, expected, seq)
            self.resyncs += 1
            RESYNCS.inc()
            await self.index.clear_worker(worker)
        self.next_seq[worker] = seq + 1
        await self.index.apply(worker, batch)

    async def _on_message(self, term: int, msg) -> None:
        """One stream message, while leader: apply it, then record it as applied under the lease."""
        async with self._lock:
            if term != self._term:
                return
            sseq = msg.metadata.sequence.stream
            if sseq <= self.applied_seq:
                return
            headers = msg.headers or {}
            worker = headers.get(WORKER_HEADER) or msg.subject.rsplit(".", 1)[-1]
            try:
                seq: int | None = int(headers.get(SEQ_HEADER, "0"))
            except ValueError:
                log.warning("dropped KV events of %s with a bad sequence header", worker)
                seq = None
            try:
                if seq is not None:
                    try:
                        await self.on_batch(worker, seq, msg.data)
                    except (RedisError, OSError):
                        raise
                    except Exception:  # a bug, not a fault: skip the batch rather than stall the index
                        log.exception("applying KV events of %s failed: skipped them", worker)
                nxt = self.next_seq.get(worker) if seq is not None else None
                ours = await self.lease.commit(
                    self._stream_id, sseq, worker if nxt is not None else "", nxt or 0
                )
            except (RedisError, OSError) as exc:
                log.warning(
                    "applying stream message %d failed (%r): resuming there once Redis answers", sseq, exc
                )
                self._term += 1
                self._restart = True
                return
            if not ours:
                log.warning("%s: lost the write lease: stopped applying events", self.replica_id)
                self._term += 1
                self.is_leader = False
                return
            self.applied_seq = sseq

    # -- leadership ----------------------------------------------------------------------------------
    async def tick(self) -> None:
        """Hold the lease; (re)start consuming where the progress says when needed; expire workers."""
        assert self.bus is not None
        reconnects = self.bus.nc.stats["reconnects"]
        if reconnects != self._reconnects:  # NATS came back: its push consumers are gone
            self._reconnects = reconnects
            self._forgive_silence()
            await ensure_stream(self.bus)  # re-created if the server lost it
            self._restart = True
        held = await self.lease.hold()
        if held == 0:
            if self.is_leader or self._sub is not None:
                log.info("%s: another replica holds the write lease: standing by", self.replica_id)
                await self._stop_consuming()
            self.is_leader = False
            return
        new_term = held == 1 or not self.is_leader
        if new_term or self._restart or self._sub is None:
            await self._start_consuming(new_term)
        # Silence heard through a broken connection proves nothing (a reconnect since the top of this
        # round is handled at the next one).
        if self.bus.nc.is_connected and self.bus.nc.stats["reconnects"] == self._reconnects:
            await self.expire()

    async def _start_consuming(self, new_term: bool) -> None:
        assert self.bus is not None
        await self._stop_consuming()
        js = self.bus.nc.jetstream()
        info = await js.stream_info(STREAM)
        stream_id = info.created.isoformat() if info.created else STREAM
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
        self.next_seq = dict(progress.next_seq)
        if not new_term:
            log.info("%s: consuming again after stream sequence %d", self.replica_id, applied)
        else:
            log.info(
                "%s: holds the write lease: applying events after stream sequence %d",
                self.replica_id,
                applied,
            )
            now = time.monotonic()
            for worker in await self.index.workers():  # indexed under a previous leader: beating?
                self.last_beat.setdefault(worker, (now, self.silent_worker_s / MISSED_BEATS))
        if applied:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=applied + 1)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        self._term += 1
        self._sub = await js.subscribe(
            f"{Subjects.KV_EVENTS}.>",
            stream=STREAM,
            cb=functools.partial(self._on_message, self._term),
            ordered_consumer=True,
            config=config,
        )
        self.is_leader = True
        self._restart = False

    async def _stop_consuming(self) -> None:
        async with self._lock:  # not in the middle of a batch
            self._term += 1
            sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2)

    async def _supervise(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception as exc:  # Redis or NATS unreachable: stop writing, retry next round
                if not failing:
                    log.warning(
                        "%s: %r: stopped writing; retrying every %.2f s", self.replica_id, exc, self.tick_s
                    )
                failing = True
                if self._sub is not None:
                    await self._stop_consuming()
                    self._restart = True
            else:
                if failing:
                    log.info("%s: Redis and NATS answer again", self.replica_id)
                failing = False

    # -- workers -------------------------------------------------------------------------------------
    def _forgive_silence(self) -> None:
        """After a NATS outage every worker was silent, not dead: each gets `silent_worker_s` (or its
        own three beats, if longer) from now to be heard again."""
        now = time.monotonic()
        floor = self.silent_worker_s / MISSED_BEATS
        self.last_beat = {w: (now, max(iv, floor)) for w, (_t, iv) in self.last_beat.items()}

    async def expire(self) -> list[str]:
        now = time.monotonic()
        dead = [w for w, (t, iv) in self.last_beat.items() if now - t > MISSED_BEATS * iv]
        for w in dead:
            del self.last_beat[w]
            self.next_seq.pop(w, None)
            await self.index.clear_worker(w)
            await self.lease.forget_worker(w)
            log.info("worker %s stopped beating: removed from the index", w)
        return dead

    # -- lifecycle -----------------------------------------------------------------------------------
    async def attach(self, bus: Bus) -> None:
        """Serve heartbeats and overlap queries, take the write lease if nobody holds it, and keep
        supervising (lease, consumer, expiry) in the background until `close()`."""
        self.bus = bus
        self._reconnects = bus.nc.stats["reconnects"]
        await ensure_stream(bus)

        async def on_beat(hb: Heartbeat, _raw) -> None:
            self.last_beat[hb.stats.worker_id] = (time.monotonic(), hb.interval_s)

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
        self._task = asyncio.create_task(self._supervise())

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
