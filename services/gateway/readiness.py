"""`GET /ready`: whether this gateway can serve a request now, as opposed to `/health` (the process is up).

Ready means: connected to NATS and at least one worker that takes `generate` (role aggregated or
decode; a prefill worker serves no client) has sent a heartbeat within its last `MISSED_BEATS`
intervals: the rule the router applies before it offers a worker (services/router/workers.py), so a
worker the gateway counts is one the router would pick.

Why heartbeats, not a question to the router: the answer is in memory when the probe comes, so a
probe costs no round trip and cannot outlast a Kubernetes probe's 1 s `timeoutSeconds` while the
router checks its index (its health handler does). The price is one small message per worker per
heartbeat interval (1 s) decoded here, once: flow control keeps the workers' reports (flow.py) and
readiness reads them from there; a dead router is not seen by `/ready` (its requests fail with 503
`service_timeout`, and the router's own probes restart it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from kvmesh.libs.bus import Bus
from kvmesh.services.gateway.flow import FlowController


class Readiness:
    """Serving workers as flow control heard them. `start()` makes sure the heartbeats are watched
    (idempotent: called when the gateway starts, and by the first probe in hosts that do not)."""

    def __init__(self, bus: Bus, flow: FlowController, watch: Callable[[], Awaitable[None]]) -> None:
        self.bus = bus
        self.flow = flow
        self._watch = watch

    async def start(self) -> None:
        await self._watch()

    def serving_workers(self) -> list[str]:
        """Workers heard from recently enough; the stale ones are forgotten."""
        return self.flow.serving_workers()

    def reason_not_ready(self) -> str | None:
        """None when ready, else why not (the 503's message)."""
        if not self.bus.nc.is_connected:
            return "not connected to NATS"
        if not self.serving_workers():
            return "no worker can take requests: none has sent a heartbeat recently"
        return None
