"""`--index local`: the router's own replica of the KV block index, in memory.

It reads the workers' KV event stream (JetStream `KVMESH_KV_EVENTS`) from its start, as a kv-index
rebuilding Redis does, and applies it through the same `KVEventFeed` (libs/kv_event_feed.py:
sequence gaps resync a worker, repeats are skipped, silent workers are dropped) into a
`MemoryBlockIndex`. A routing decision then reads the overlap from memory: no round trip at all.
Every router replica keeps its own replica; the kv-index stays the global index for anyone else.

`ok` (reported as the router's `kv_index_ok`) is False until the replica has caught up with what
the stream held when it started reading, and while NATS or JetStream is unreachable; the router then
routes by load. After a NATS reconnect (its push consumer is gone with the server's memory) it
reads on from the last message it applied; a re-created stream (the server lost its store) is read
again from its start into an emptied replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.block_hash import hash_seed
from kvmesh.libs.kv_contract import ContractGate
from kvmesh.libs.kv_event_feed import KVEventFeed
from kvmesh.libs.kv_event_stream import (
    ReconnectWatch,
    StreamReader,
    batch_contract,
    batch_origin,
    every,
    stream_info,
)
from kvmesh.libs.memory_index import MemoryBlockIndex

log = logging.getLogger(__name__)


class LocalIndex:
    def __init__(
        self,
        extra_keys: bytes,
        seed: int | None = None,
        silent_worker_s: float = 10.0,
        tick_s: float = 0.25,
        gate: ContractGate | None = None,  # the router's: a worker it refuses is not indexed either
    ) -> None:
        self.index = MemoryBlockIndex(extra_keys, hash_seed(seed))
        self.feed = KVEventFeed(self.index, silent_worker_s, gate)
        self.reader = StreamReader(self._on_message)
        self.tick_s = tick_s
        self.applied_seq = 0  # last stream sequence applied
        self.caught_up = False  # reached the stream's end as of when reading started
        self._target = 0  # that end
        self._stream_id = ""  # identity (creation time) of the stream applied_seq counts in
        self.rereads = 0  # streams found re-created, so read again from their start into an emptied replica
        self.watch: ReconnectWatch | None = None
        self._task: asyncio.Task | None = None
        self.bus: Bus | None = None

    @property
    def ok(self) -> bool:
        """The replica is complete and following the stream."""
        return self.caught_up and self.reader.active and self.bus is not None and self.bus.nc.is_connected

    @property
    def state(self) -> str:
        if self.ok:
            return "following the KV event stream"
        return (
            "catching up with the KV event stream"
            if self.reader.active
            else "not reading the KV event stream"
        )

    def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        return self.index.overlap_now(block_hashes)

    def beat(self, worker: str, interval_s: float) -> None:
        self.feed.beat(worker, interval_s)

    # -- following the stream ------------------------------------------------------------------------
    async def start(self, bus: Bus) -> None:
        """Start reading the stream (a failure is retried every tick) and keep supervising it."""
        self.bus = bus
        self.watch = ReconnectWatch(bus)
        try:
            await self.sync()
        except Exception as exc:
            log.warning("KV event stream unavailable (%r): routing by load until it answers", exc)
        what = "local KV index: reading the event stream"
        self._task = asyncio.create_task(every(self.tick_s, self.sync, what, self.reader.stop))

    async def sync(self) -> None:
        """Subscribe again when needed (first start, failure, NATS reconnect); drop silent workers."""
        assert self.watch is not None
        if self.watch.reconnected():  # NATS came back: its push consumers are gone
            self.feed.forgive_silence()
            await self.reader.stop()
        if not self.reader.active:
            await self._subscribe()
        if self.watch.steady:  # silence heard through a broken connection proves nothing
            await self.feed.expire()

    async def _subscribe(self) -> None:
        assert self.bus is not None
        stream_id, info = await stream_info(self.bus)
        if stream_id != self._stream_id:
            if self._stream_id:
                log.warning("the KV event stream was re-created: reading the new one from its start")
                self.rereads += 1
            self.index.clear()
            self.feed.reset()
            self.applied_seq, self.caught_up = 0, False
            self._stream_id = stream_id
        if not self.caught_up:
            self._target = info.state.last_seq
            self.caught_up = info.state.messages == 0 or self.applied_seq >= self._target
        await self.reader.start(self.bus, self.applied_seq)
        log.info(
            "following the KV event stream after sequence %d (%s)",
            self.applied_seq,
            "caught up" if self.caught_up else f"catching up to {self._target}",
        )

    async def _on_message(self, msg) -> None:
        meta = msg.metadata
        sseq = meta.sequence.stream
        if sseq <= self.applied_seq:
            return
        worker, seq = batch_origin(msg)
        if seq is not None:
            try:
                await self.feed.on_batch(worker, seq, msg.data, batch_contract(msg))
            except Exception:  # a bug, not a fault: skip the batch rather than stall the replica
                log.exception("applying KV events of %s failed: skipped them", worker)
        self.applied_seq = sseq
        if not self.caught_up and (sseq >= self._target or meta.num_pending == 0):
            self.caught_up = True
            log.info(
                "caught up with the KV event stream at sequence %d: %d workers, %d blocks indexed",
                sseq,
                len(self.index.emap),
                len(self.index.holders),
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.reader.stop()
