"""Publishes the engine's KV events (what its block pool stored and evicted) for the kv-index.

Batches go to `kvmesh.kv.events.<worker_id>` on the JetStream stream KVMESH_KV_EVENTS, so a
restarted index can replay them. The payload is a vLLM-shaped `KVEventBatch` (msgpack); the worker id
and a per-worker sequence number travel in headers. Sequence 0 is always an AllBlocksCleared batch:
a (re)started worker's cache is empty, whatever an index remembers about it. A gap in the sequence
tells the index to resync that worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.js.api import StreamConfig

from kvmesh.libs.bus import Bus, encode
from kvmesh.schemas.kv_events import AllBlocksCleared, KVEvent, KVEventBatch
from kvmesh.schemas.messages import Subjects

log = logging.getLogger(__name__)

STREAM = "KVMESH_KV_EVENTS"
SEQ_HEADER = "Kvmesh-Seq"
WORKER_HEADER = "Kvmesh-Worker"


async def ensure_stream(bus: Bus, max_age_s: float = 3600.0) -> bool:
    """Create (or keep) the KV-event stream. False when the server has no JetStream."""
    try:
        js = bus.nc.jetstream()
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[f"{Subjects.KV_EVENTS}.>"], max_age=max_age_s)
        )
        return True
    except Exception as exc:
        log.warning("JetStream unavailable (%r): KV events go out on core NATS, without replay", exc)
        return False


class KVEventPublisher:
    def __init__(
        self, bus: Bus, worker_id: str, drain: Callable[[], list[KVEvent]], interval_s: float = 0.05
    ):
        self.bus = bus
        self.worker_id = worker_id
        self.subject = f"{Subjects.KV_EVENTS}.{worker_id}"
        self.drain = drain
        self.interval_s = interval_s
        self.seq = 0
        self._js = None

    async def start(self) -> None:
        if await ensure_stream(self.bus):
            self._js = self.bus.nc.jetstream()
        await self.publish([AllBlocksCleared()])

    async def publish(self, events: list[KVEvent]) -> None:
        data = encode(KVEventBatch(ts=time.time(), events=events))
        headers = {SEQ_HEADER: str(self.seq), WORKER_HEADER: self.worker_id}
        if self._js is not None:
            await self._js.publish(self.subject, data, headers=headers)
        else:
            await self.bus.nc.publish(self.subject, data, headers=headers)
        self.seq += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Drain and publish every `interval_s` until `stop`; a failed batch is retried next round."""
        pending: list[KVEvent] = []
        while not stop.is_set():
            pending += self.drain()
            if pending:
                try:
                    await self.publish(pending)
                    pending = []
                except Exception as exc:  # NATS reconnecting: keep the events, same sequence number
                    log.warning("publishing %d KV events failed: %r", len(pending), exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        pending += self.drain()
        if pending:
            with contextlib.suppress(Exception):
                await self.publish(pending)
