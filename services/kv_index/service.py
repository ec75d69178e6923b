"""kv-index service: JetStream KV events -> the Redis block index; answers prefix-overlap queries.

Each replica replays the event stream from its start (JetStream keeps an hour) and applies every
batch: writes are idempotent, so replicas can run side by side, and a restarted replica (or a
wiped Redis) is rebuilt by the replay. A per-worker sequence gap means events were lost: the
worker's entries are dropped (they would be wrong) and rebuilt from its next events. Workers whose
heartbeats stop are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import msgspec
from nats.js.api import DeliverPolicy

from kvmesh.libs.bus import Bus, decode
from kvmesh.schemas.kv_events import KVEventBatch
from kvmesh.schemas.messages import ErrorReply, Heartbeat, OverlapReply, OverlapRequest, Subjects
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.worker.kv_events import SEQ_HEADER, STREAM, WORKER_HEADER, ensure_stream

log = logging.getLogger(__name__)
MISSED_BEATS = 3


@dataclass(frozen=True, slots=True)
class KVIndexConfig:
    nats_url: str
    redis_url: str
    model: str


class KVIndexService:
    def __init__(self, index: KVIndex) -> None:
        self.index = index
        self.next_seq: dict[str, int] = {}
        self.last_beat: dict[str, tuple[float, float]] = {}  # worker -> (monotonic time, interval)
        self.resyncs = 0

    async def on_batch(self, worker: str, seq: int, data: bytes) -> None:
        try:
            batch = decode(data, KVEventBatch)
        except msgspec.DecodeError as exc:
            log.warning("dropped a malformed KV event batch from %s: %s", worker, exc)
            return
        expected = self.next_seq.get(worker)
        if seq != 0 and expected is not None and seq != expected:
            log.warning("KV events of %s jumped from %d to %d: resyncing it", worker, expected, seq)
            self.resyncs += 1
            await self.index.clear_worker(worker)
        self.next_seq[worker] = seq + 1
        await self.index.apply(worker, batch)

    async def expire(self) -> list[str]:
        now = time.monotonic()
        dead = [w for w, (t, iv) in self.last_beat.items() if now - t > MISSED_BEATS * iv]
        for w in dead:
            del self.last_beat[w]
            self.next_seq.pop(w, None)
            await self.index.clear_worker(w)
            log.info("worker %s stopped beating: removed from the index", w)
        return dead

    async def attach(self, bus: Bus) -> None:
        await ensure_stream(bus)
        js = bus.nc.jetstream()

        async def on_msg(msg) -> None:
            headers = msg.headers or {}
            worker = headers.get(WORKER_HEADER) or msg.subject.rsplit(".", 1)[-1]
            try:
                seq = int(headers.get(SEQ_HEADER, "0"))
                await self.on_batch(worker, seq, msg.data)
            except Exception:
                log.exception("applying KV events of %s failed", worker)

        await js.subscribe(
            f"{Subjects.KV_EVENTS}.>",
            stream=STREAM,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )

        async def on_beat(hb: Heartbeat, _raw) -> None:
            self.last_beat[hb.stats.worker_id] = (time.monotonic(), hb.interval_s)

        async def on_overlap(req: OverlapRequest, _raw) -> OverlapReply | ErrorReply:
            return OverlapReply(overlap=await self.index.overlap(req.block_hashes))

        await bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat)
        await bus.serve(Subjects.KV_INDEX_OVERLAP, OverlapRequest, on_overlap, queue="kv-index")

    async def expiry_loop(self, stop: asyncio.Event, every_s: float = 0.5) -> None:
        while not stop.is_set():
            try:
                await self.expire()
            except Exception as exc:  # Redis down: try again next round
                log.warning("expiring workers failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
