"""Admission at the gateway: a bound on generation requests in flight.

The gateway keeps no queue of its own. A request over the bound is answered 429 with Retry-After at
once; the queues that hold waiting work are the workers' (bounded too: a full worker answers
`overloaded` and the dispatcher tries another, see dispatch.py). Together they keep memory bounded
whatever the offered load: the gateway holds at most `limit` requests, each worker at most its
running batch plus `--max-waiting`.
"""

from __future__ import annotations

from kvmesh.services.gateway.errors import RETRY_AFTER_S, GatewayError


class InflightLimit:
    """Counts generation requests from arrival until their response has ended (streams included)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: unbounded
        self.inflight = 0
        self.rejected = 0

    def acquire(self) -> None:
        """Take a slot or raise 429; every successful acquire() needs exactly one release()."""
        if self.limit and self.inflight >= self.limit:
            self.rejected += 1
            raise GatewayError.overloaded(
                f"the gateway is at capacity ({self.limit} requests in flight); retry later", RETRY_AFTER_S
            )
        self.inflight += 1

    def release(self) -> None:
        assert self.inflight > 0, "release() without acquire()"
        self.inflight -= 1
