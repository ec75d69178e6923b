"""`GET /ready`: whether this gateway can serve a request now, as opposed to `/health` (the process is up).

Ready means: connected to NATS and at least one worker that takes `generate` (role aggregated or
decode; a prefill worker serves no client) has sent a heartbeat within its last `MISSED_BEATS`
intervals: the rule the router applies before it offers a worker (services/router/workers.py), so a
worker the gateway counts is one the router would pick.

Why heartbeats, not a question to the router: the answer is in memory when the probe comes, so a
probe costs no round trip and cannot outlast a Kubernetes probe's 1 s `timeoutSeconds` while the
router checks its index (its health handler does). The price is one small message per worker per
heartbeat interval (1 s) decoded here; a dead router is not seen by `/ready` (its requests fail
with 503 `service_timeout`, and the router's own probes restart it).
"""

from __future__ import annotations

import asyncio
import time

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import Heartbeat, Subjects

MISSED_BEATS = 3  # as the router: silent this many heartbeat intervals, a worker is gone
SERVING_ROLES = frozenset({"aggregated", "decode"})


class Readiness:
    """Serving workers by heartbeat. `start()` subscribes (idempotent: called when the gateway starts,
    and by the first probe in hosts that do not call it)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._expires: dict[str, float] = {}  # worker id -> monotonic time its heartbeat goes stale
        self._started: asyncio.Task | None = None

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(
                self.bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, self._on_beat)
            )
        await asyncio.shield(self._started)

    async def _on_beat(self, hb: Heartbeat, _raw: object) -> None:
        self.beat(hb, time.monotonic())

    def beat(self, hb: Heartbeat, now: float) -> None:
        if hb.stats.role in SERVING_ROLES:
            self._expires[hb.stats.worker_id] = now + MISSED_BEATS * hb.interval_s

    def serving_workers(self, now: float) -> list[str]:
        """Workers heard from recently enough; the stale ones are forgotten."""
        for wid in [w for w, t in self._expires.items() if t < now]:
            del self._expires[wid]
        return sorted(self._expires)

    def reason_not_ready(self, now: float) -> str | None:
        """None when ready, else why not (the 503's message)."""
        if not self.bus.nc.is_connected:
            return "not connected to NATS"
        if not self.serving_workers(now):
            return "no worker can take requests: none has sent a heartbeat recently"
        return None
