"""The router's view of the live workers, fed by heartbeats."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvmesh.schemas.messages import Heartbeat, WorkerStats

MISSED_BEATS = 3  # a worker is dropped after this many heartbeat intervals of silence


@dataclass(slots=True)
class WorkerInfo:
    stats: WorkerStats
    last_seen: float  # monotonic
    interval_s: float
    assigned_tokens: int = 0  # tokens routed here since its last heartbeat (not in its stats yet)

    @property
    def load_tokens(self) -> int:
        return self.stats.outstanding_tokens + self.assigned_tokens


class WorkerRegistry:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerInfo] = {}
        # No worker can expire before this (monotonic): a decision with hundreds of live workers
        # skips the scan. Beats and forgiveness only push deadlines later, except a new worker's.
        self._next_expiry = 0.0

    def beat(self, hb: Heartbeat, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        wid = hb.stats.worker_id
        self.workers[wid] = WorkerInfo(hb.stats, now, hb.interval_s)
        self._next_expiry = min(self._next_expiry, now + MISSED_BEATS * hb.interval_s)

    def drop(self, worker_id: str) -> None:
        """Forget a worker now (refused: see RouterService.admit)."""
        self.workers.pop(worker_id, None)

    def forgive(self, until: float) -> None:
        """Silence up to `until` (monotonic) does not count: the router itself was cut off from NATS,
        so no heartbeat could reach it; the workers are presumed alive until then."""
        for info in self.workers.values():
            info.last_seen = max(info.last_seen, until)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop workers that stopped beating; returns their ids."""
        now = time.monotonic() if now is None else now
        if now <= self._next_expiry:
            return []
        dead = [w for w, i in self.workers.items() if now - i.last_seen > MISSED_BEATS * i.interval_s]
        for w in dead:
            del self.workers[w]
        deadlines = [i.last_seen + MISSED_BEATS * i.interval_s for i in self.workers.values()]
        self._next_expiry = min(deadlines, default=now)
        return dead

    def live(self, exclude: list[str] | tuple[str, ...] = ()) -> list[WorkerInfo]:
        self.expire()
        return [i for w, i in self.workers.items() if w not in exclude]
