"""Conditional disaggregation: should this request's prompt be prefilled on a prefill worker?

Remote prefill pays a KV transfer and a second hop to take a long prefill off the decode worker, so
its running requests keep their inter-token latency. It is worth it only when the part of the prompt
the decode worker does not already hold is long, and only while the prefill pool has room: a
saturated pool would add queueing on top of the transfer, and the decode worker is then better
off prefilling locally.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

from kvmesh.libs.kv_contract import DEFAULT_BLOCK_SIZE
from kvmesh.services.router.workers import WorkerInfo


class PrefillChoice(NamedTuple):
    worker: WorkerInfo | None  # None: prefill on the decode worker itself
    reason: str  # remote | short | prefill_busy | no_prefill_workers
    uncached_tokens: int  # prompt tokens the chosen prefill worker must compute (0 when local)


@dataclass(frozen=True, slots=True)
class PrefillPolicy:
    min_remote_tokens: int = 512  # uncached prompt tokens on the decode worker below which: local
    max_queue_tokens: int = 16384  # a prefill worker with more outstanding tokens counts as saturated
    block_size: int = DEFAULT_BLOCK_SIZE  # the router sets the workers' (their KV contract)

    def choose(
        self,
        num_tokens: int,
        uncached_on_decode: int,
        pool: list[WorkerInfo],
        overlap: dict[str, int],
        rng: random.Random,
    ) -> PrefillChoice:
        if not pool:
            return PrefillChoice(None, "no_prefill_workers", 0)
        if uncached_on_decode < self.min_remote_tokens:
            return PrefillChoice(None, "short", 0)
        costs = []
        for w in pool:
            if w.load_tokens >= self.max_queue_tokens:
                continue
            cached = min(overlap.get(w.stats.worker_id, 0) * self.block_size, num_tokens)
            uncached = num_tokens - cached
            costs.append((uncached + w.load_tokens, uncached, w))
        if not costs:
            return PrefillChoice(None, "prefill_busy", 0)
        best = min(c for c, _, _ in costs)
        _, uncached, worker = rng.choice([c for c in costs if c[0] == best])
        return PrefillChoice(worker, "remote", uncached)
