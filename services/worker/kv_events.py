"""Publishes the engine's KV events (what its block pool stored and evicted) for the kv-index.

Batches go to `kvmesh.kv.events.<worker_id>` on the JetStream stream KVMESH_KV_EVENTS, so a
restarted index can replay them. The payload is a vLLM-shaped `KVEventBatch` (msgpack); the worker id
and a per-worker sequence number travel in headers. Sequence 0 is always an AllBlocksCleared batch:
a (re)started worker's cache is empty, whatever an index remembers about it. A gap in the sequence
tells the index to resync that worker. The worker's KV contract (libs/kv_contract.py) travels in a
header too. The stream's contract (name, headers) is libs/kv_event_stream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kvmesh.libs.bus import Bus, encode
from kvmesh.libs.kv_contract import CONTRACT_HEADER, contract_header
from kvmesh.libs.kv_event_stream import SEQ_HEADER, WORKER_HEADER, ensure_stream
from kvmesh.libs.kv_event_stream import STREAM as STREAM  # its readers' name for it too
from kvmesh.schemas.kv_events import AllBlocksCleared, KVEvent, KVEventBatch
from kvmesh.schemas.messages import KVContract, Subjects

log = logging.getLogger(__name__)


class KVEventPublisher:
    def __init__(
        self,
        bus: Bus,
        worker_id: str,
        drain: Callable[[], list[KVEvent]],
        interval_s: float = 0.05,
        contract: KVContract | None = None,
    ):
        self.bus = bus
        self.worker_id = worker_id
        # the worker's KV contract, in every batch's headers: an index reading the stream (a replay
        # included, with no heartbeat to go by) skips the batches of a worker hashing otherwise
        self.contract = contract_header(contract) if contract is not None else None
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
        if self.contract is not None:
            headers[CONTRACT_HEADER] = self.contract
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
