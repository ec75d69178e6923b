"""Applying workers' KV events to a block index: the logic every index shares, whatever its storage.

Two indexes consume the same event stream (libs/kv_event_stream.py): the kv-index service writes
the global one in Redis (services/kv_index/index.py), and a router with `--index local` keeps its
own replica in memory (libs/memory_index.py). Both are a `BlockIndex`, both fed by a `KVEventFeed`:
- keys are re-derived from the tokens each BlockStored carries, with the tokenizer's chained hash,
  so that any publisher (stock vLLM with its own hashes included) feeds the index; a per-worker map
  from the publisher's hash to our key serves removals and parent lookups;
- a worker's batches carry sequence numbers: sequence 0 (AllBlocksCleared) is every worker's first
  batch, a batch seen again (a publish retried after its ack was lost) is skipped, and a gap drops
  the worker's entries (they may be wrong) until its next events rebuild them;
- a worker silent for three heartbeat intervals is dropped; one known only from its events (replayed
  after its death) gets `silent_worker_s` to be heard;
- a worker whose batches carry another KV contract (libs/kv_contract.py; a `ContractGate` given) is
  not indexed: its keys could never match the prompts' hashes.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec

from kvmesh.libs.bus import decode
from kvmesh.libs.engine.block_hash import BlockHash, hash_block, root_hash, salted_extra_keys
from kvmesh.libs.kv_contract import ContractGate
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KVEventBatch
from kvmesh.schemas.messages import KVContract

log = logging.getLogger(__name__)

MISSED_BEATS = 3  # a worker is dropped after this many heartbeat intervals of silence

BatchOutcome = Literal["applied", "resynced", "repeated", "malformed", "refused"]


class BlockIndex(ABC):
    """Which workers hold which blocks, written from KV events. Subclasses store the entries: a
    (worker, publisher hash -> key) map and key -> workers; `apply` derives the keys."""

    def __init__(self, extra_keys: bytes, seed: int) -> None:
        self.extra_keys = extra_keys  # the hash namespace (model name) the tokenizer hashes in
        self.seed = seed

    async def apply(self, worker: str, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                await self._stored(worker, event, batch.ts or time.time())
            elif isinstance(event, BlockRemoved):
                await self.remove(worker, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                await self.clear_worker(worker)

    async def _stored(self, worker: str, ev: BlockStored, ts: float) -> None:
        if ev.parent_block_hash is None:
            parent = root_hash(self.seed)
        else:
            known = await self.key_of(worker, ev.parent_block_hash)
            if known is None:
                return  # the parent was never indexed (evicted meanwhile): the chain is unusable
            parent = known
        bs = ev.block_size
        blocks = []
        # a salted prompt's first block: its salt is the last of its extra keys (vLLM's layout)
        first = ev.extra_keys[0] if ev.parent_block_hash is None and ev.extra_keys else None
        first_keys = salted_extra_keys(self.extra_keys, first[-1]) if first else None
        for i, engine_hash in enumerate(ev.block_hashes):
            tokens = ev.token_ids[i * bs : (i + 1) * bs]
            if len(tokens) < bs:
                break
            keys = first_keys if i == 0 and first_keys else self.extra_keys
            parent = hash_block(parent, tokens, keys, self.seed)
            blocks.append((engine_hash, parent))
        if blocks:
            await self.add(worker, blocks, ts)

    @abstractmethod
    async def key_of(self, worker: str, engine_hash: EngineHash) -> BlockHash | None:
        """Our key of a block the worker stored under its own hash, or None if not indexed."""

    @abstractmethod
    async def add(self, worker: str, blocks: list[tuple[EngineHash, BlockHash]], ts: float) -> None:
        """The worker stored these blocks (publisher hash, our key), in prefix order, at `ts`."""

    @abstractmethod
    async def remove(self, worker: str, engine_hashes: list[EngineHash]) -> None:
        """The worker evicted these blocks (its own hashes; unknown ones are ignored)."""

    @abstractmethod
    async def clear_worker(self, worker: str) -> None:
        """Forget everything a worker holds (it cleared its cache, restarted, died or skipped events)."""

    @abstractmethod
    async def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """worker -> number of leading blocks of this prompt it holds (workers holding none absent)."""

    @abstractmethod
    async def workers(self) -> set[str]:
        """Every worker with entries in the index."""


class KVEventFeed:
    """Feeds one `BlockIndex` in order: per-worker sequence checks, then the batch; tracks which
    workers are alive (heartbeats) and drops the others' entries on `expire()`."""

    def __init__(
        self, index: BlockIndex, silent_worker_s: float = 10.0, gate: ContractGate | None = None
    ) -> None:
        self.index = index
        self.silent_worker_s = silent_worker_s
        self.gate = gate
        self.refused: dict[str, str] = {}  # worker -> the KV contract field its batches differ in
        self.next_seq: dict[str, int] = {}  # worker -> the sequence number its next batch must carry
        self.last_beat: dict[str, tuple[float, float]] = {}  # worker -> (monotonic time, interval)
        self.resyncs = 0  # workers dropped for a gap in their sequence numbers

    async def on_batch(
        self, worker: str, seq: int, data: bytes, contract: KVContract | None = None
    ) -> BatchOutcome:
        """Apply one batch (the worker's `seq`-th) unless it repeats one; a gap first drops the worker.
        `contract`: the publisher's KV contract (its batch header), checked against the gate's."""
        try:
            batch = decode(data, KVEventBatch)
        except msgspec.DecodeError as exc:
            log.warning("dropped a malformed KV event batch from %s: %s", worker, exc)
            return "malformed"
        self.expect(worker)
        if self.gate is not None and (reason := self.gate.check(contract)) is not None:
            if self.refused.get(worker) != reason:
                self.refused[worker] = reason
                log.warning("not indexing %s: its KV contract differs in %s", worker, reason)
                await self.index.clear_worker(worker)
            self.next_seq[worker] = seq + 1
            return "refused"
        self.refused.pop(worker, None)
        outcome: BatchOutcome = "applied"
        expected = self.next_seq.get(worker)
        if seq != 0 and expected is not None and seq != expected:
            if seq < expected:  # published twice (a retry after a lost ack): applied already
                log.debug("skipped a repeated KV event batch %d of %s", seq, worker)
                return "repeated"
            log.warning("KV events of %s jumped from %d to %d: resyncing it", worker, expected, seq)
            self.resyncs += 1
            outcome = "resynced"
            await self.index.clear_worker(worker)
        self.next_seq[worker] = seq + 1
        await self.index.apply(worker, batch)
        return outcome

    def beat(self, worker: str, interval_s: float) -> None:
        self.last_beat[worker] = (time.monotonic(), interval_s)

    def expect(self, worker: str) -> None:
        """A worker known without a heartbeat (from its events, or found in the index): dropped
        after `silent_worker_s` unless it beats."""
        if worker not in self.last_beat:
            self.last_beat[worker] = (time.monotonic(), self.silent_worker_s / MISSED_BEATS)

    def forgive_silence(self) -> None:
        """After our own NATS outage every worker was silent, not dead: each gets `silent_worker_s`
        (or its own three beats, if longer) from now to be heard again."""
        now = time.monotonic()
        floor = self.silent_worker_s / MISSED_BEATS
        self.last_beat = {w: (now, max(iv, floor)) for w, (_t, iv) in self.last_beat.items()}

    async def expire(self, then: Callable[[str], Awaitable[None]] | None = None) -> list[str]:
        """Drop the entries of workers that stopped beating (calling `then(worker)` after each);
        returns their ids."""
        now = time.monotonic()
        dead = [w for w, (t, iv) in self.last_beat.items() if now - t > MISSED_BEATS * iv]
        for w in dead:
            del self.last_beat[w]
            self.next_seq.pop(w, None)
            await self.index.clear_worker(w)
            if then is not None:
                await then(w)
            log.info("worker %s stopped beating: removed from the index", w)
        return dead

    def reset(self) -> None:
        """Forget every worker's sequence (the index was emptied: the stream is read again)."""
        self.next_seq.clear()
