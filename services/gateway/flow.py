"""Flow control at the gateway: requests that cannot start yet wait here, in a bounded queue, not in
timeouts.

Why the gateway: it holds the client's connection (a client that leaves is dropped from the queue and
never reaches a worker), it answers a 429 without a hop, and it already counts what it has in flight.
Each gateway replica keeps its own queue over the same workers, as each llm-d endpoint picker does.

- **Dispatch when the workers have room.** Workers report, in their heartbeats, how many requests
  they run at most (`max_running`), how many they run and queue, and their KV usage. The gateway lets
  `sum(max_running + headroom)` requests be on the workers at once (a worker whose KV cache is nearly
  full counts only what it runs); the rest wait here. With several gateways the workers' own bound
  (`--max-waiting`) still holds: a worker that answers `overloaded` sends the request back to the head
  of its place here, not to the client.
- **Priority bands**: a lower `priority` (vLLM's field: default 0, lower runs first) always goes first.
- **Fairness between tenants** inside a band: round-robin over the tenants that have requests waiting
  (the `user` field or the `X-Tenant-Id` header), so a tenant's burst queues behind its own requests,
  not in front of another tenant's trickle. And no tenant holds more than `max_tenant_share` (7/8) of
  the workers' room: the rest stays free, so a newcomer's request starts at once instead of waiting for
  one of the burst's requests to end (the running batch would otherwise be all the burst's).
- **Bounded**: beyond `max_queue` waiting requests, or past `queue_ttl_s` of waiting, 429 with a
  Retry-After that is the measured drain time of the queue ahead.
- Without any worker heartbeat (no worker yet, or a host that sends none) the gate stands open and the
  router answers as before.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.schemas.messages import WorkerStats
from kvmesh.services.gateway.errors import GatewayError

MISSED_BEATS = 3  # as the router: silent this many heartbeat intervals, a worker is gone
SERVING_ROLES = frozenset({"aggregated", "decode"})  # a prefill worker serves no client
DEFAULT_MAX_RUNNING = 64  # a worker that does not report its bound (older or simulated): the engine's default
RATE_HALF_LIFE_S = 10.0  # the drain-rate estimate forgets a dispatch's weight after this long, by half


@dataclass(frozen=True, slots=True)
class FlowConfig:
    max_queue: int = 4096  # requests waiting in this gateway; beyond: 429 at once (0: none wait)
    queue_ttl_s: float = 600.0  # longest wait; past it: 429
    worker_headroom: int = 4  # requests on a worker beyond its running batch (its next ones, ready)
    kv_saturated: float = 0.95  # KV usage at which a worker takes nothing beyond what it runs
    # The largest share of the workers' room one tenant may hold (rounded up): the rest stays free for
    # other tenants, so a newcomer starts at once instead of waiting for a burst's request to end.
    max_tenant_share: float = 0.875
    # The worker's scheduler orders by (band, the tenant's requests in flight at dispatch): a newcomer
    # prefills ahead of the chunks of another tenant's burst (engine/scheduler.py). False: band only.
    tenant_rank: bool = True


class Arrival:
    """A request between its arrival and the queue (`FlowController.arrive`); `done()` is idempotent."""

    __slots__ = ("_flow",)

    def __init__(self, flow: FlowController) -> None:
        self._flow: FlowController | None = flow

    def done(self) -> None:
        if self._flow is not None:
            self._flow.arriving -= 1
            self._flow = None


class Slot:
    """Room for one request on the workers, from dispatch until `release()` (idempotent)."""

    __slots__ = ("_flow", "_released", "tenant", "tenant_inflight", "waited_s")

    def __init__(
        self, flow: FlowController | None, waited_s: float, tenant: str = "", tenant_inflight: int = 0
    ) -> None:
        self._flow = flow
        self._released = False
        self.tenant = tenant
        self.tenant_inflight = tenant_inflight  # the tenant's other slots when this one was granted
        self.waited_s = waited_s

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._flow is not None:
                self._flow._release(self.tenant)


@dataclass(slots=True)
class _Waiter:
    priority: int
    tenant: str
    arrival: float
    future: asyncio.Future
    gone: bool = False  # left the queue (client gone, TTL): skipped when its turn comes


@dataclass(slots=True)
class _Band:
    """One priority's waiters: per tenant a FIFO, served round-robin."""

    tenants: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)

    def push(self, w: _Waiter, front: bool) -> None:
        queue = self.tenants.setdefault(w.tenant, deque())
        if front:
            queue.appendleft(w)
            self.tenants.move_to_end(w.tenant, last=False)  # its turn comes next
        else:
            queue.append(w)

    def pop(self, eligible: Callable[[str], bool]) -> _Waiter | None:
        """The next live waiter: the oldest of the first tenant in turn that may take a slot now
        (`eligible`); that tenant then goes to the back. Tenants passed over keep their turn."""
        while True:
            tenant = next((t for t in self.tenants if eligible(t)), None)
            if tenant is None:
                return None
            queue = self.tenants[tenant]
            w = queue.popleft()
            if queue:
                self.tenants.move_to_end(tenant)
            else:
                del self.tenants[tenant]
            if not w.gone:
                return w


@dataclass(slots=True)
class _Worker:
    stats: WorkerStats
    expires: float


class FlowController:
    """One per gateway process. `admit()` waits for a slot (or raises 429); `observe()` takes the
    workers' heartbeats. Runs on the gateway's event loop only."""

    def __init__(self, config: FlowConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or FlowConfig()
        self.clock = clock
        self.inflight = 0  # slots held
        self._held: dict[str, int] = {}  # slots held by tenant
        self.waiting = 0  # live waiters
        self.arriving = 0  # requests being tokenized on their way to the queue (arrive())
        self._bands: dict[int, _Band] = {}
        self._workers: dict[str, _Worker] = {}
        self._paused_until = 0.0  # a worker answered `overloaded`: hold dispatches until a release
        self._rate = 0.0  # dispatches per second (decayed)
        self._rate_at = clock()
        self.counts: dict[str, int] = {"dispatched": 0, "rejected_full": 0, "rejected_ttl": 0, "dropped": 0}
        self.on_change: Callable[[FlowController], None] | None = None  # metrics hook

    # -- what the workers report -------------------------------------------------------------------
    def observe(self, stats: WorkerStats, interval_s: float) -> None:
        if stats.role in SERVING_ROLES:
            self._workers[stats.worker_id] = _Worker(stats, self.clock() + MISSED_BEATS * interval_s)
            self._pump()

    def serving_workers(self) -> list[str]:
        """The workers that take `generate` and were heard from within their last MISSED_BEATS
        heartbeat intervals (the router's rule; `/ready` is this list not being empty)."""
        now = self.clock()
        for wid in [w for w, s in self._workers.items() if s.expires < now]:
            del self._workers[wid]
        return sorted(self._workers)

    def capacity(self) -> int | None:
        """How many requests may be on the workers at once; None: unknown (no live worker reported)."""
        if not self.serving_workers():
            return None
        total = 0
        for w in self._workers.values():
            s = w.stats
            bound = s.max_running or DEFAULT_MAX_RUNNING
            saturated = s.kv_usage >= self.config.kv_saturated
            total += s.num_running if saturated else bound + self.config.worker_headroom
        return max(1, total)

    # -- requests ------------------------------------------------------------------------------------
    def arrive(self) -> Arrival:
        """Count a request from its arrival (ahead of its tokenization) toward the queue's bound, or
        raise the 429 it will get anyway: the requests already waiting or still on their way there
        fill the queue beyond the room the workers have. A burst's excess is refused at once, before
        any work is spent on it. `Arrival.done()` when it reaches the queue (or fails before)."""
        if (error := self.refusal()) is not None:
            raise error
        self.arriving += 1
        return Arrival(self)

    def refusal(self) -> GatewayError | None:
        """The 429 a request arriving now would get anyway (the queue is full beyond the workers'
        room), counted as a rejection; None: it may come in. Needs nothing from the request, so the
        gateway asks before reading its body (flow_gate.py)."""
        cap = self.capacity()
        if cap is None:
            return None
        room = max(0, cap - self.inflight)
        if self.waiting + self.arriving < self.config.max_queue + room:
            return None
        self.counts["rejected_full"] += 1
        self._changed()
        return self._full()

    def _full(self) -> GatewayError:
        return GatewayError.overloaded(
            f"the workers are busy and the gateway's queue is full ({self.waiting} requests "
            f"waiting, at most {self.config.max_queue}); retry later",
            self.retry_after(),
        )

    def try_admit(self, priority: int = 0, tenant: str = "") -> Slot | None:
        """A slot at once when the workers have room and nobody waits; None: the request must `wait()`.
        Raises GatewayError 429 when it could not even wait (the queue is full)."""
        if self._has_room() and self._within_share(tenant) and not self._due_before(priority):
            return self._grant(0.0, tenant)
        if self.waiting >= self.config.max_queue:
            self.counts["rejected_full"] += 1
            self._changed()
            raise self._full()
        return None

    async def wait(
        self, priority: int = 0, tenant: str = "", front: bool = False, ttl_s: float | None = None
    ) -> Slot:
        """Wait in the queue for a slot; raises GatewayError 429 past the TTL. Cancelled (the client
        left), the request leaves the queue at once. `front`: back from a worker that was full, it
        keeps its place at the head of its tenant's queue (and then over the queue bound too)."""
        ttl_s = self.config.queue_ttl_s if ttl_s is None else ttl_s
        w = _Waiter(priority, tenant, self.clock(), asyncio.get_running_loop().create_future())
        self._bands.setdefault(priority, _Band()).push(w, front)
        self.waiting += 1
        self._changed()
        self._pump()
        try:
            return await asyncio.wait_for(asyncio.shield(w.future), max(0.0, ttl_s))
        except TimeoutError:
            if not self._leave(w):
                return w.future.result()  # granted at the very moment the TTL passed
            self.counts["rejected_ttl"] += 1
            self._changed()
            raise GatewayError.overloaded(
                f"waited {self.config.queue_ttl_s:.0f} s in the gateway's queue; retry later",
                self.retry_after(),
            ) from None
        except asyncio.CancelledError:
            if not self._leave(w):  # granted, but nobody will use it
                w.future.result().release()
            else:
                self.counts["dropped"] += 1
                self._changed()
            raise

    async def admit(self, priority: int = 0, tenant: str = "") -> Slot:
        """`try_admit()`, else `wait()`."""
        slot = self.try_admit(priority, tenant)
        return slot if slot is not None else await self.wait(priority, tenant)

    def backoff(self, hold_s: float = 0.2) -> None:
        """A worker refused for being full although the gate had room (another gateway filled it):
        dispatch nothing more until a slot comes back or `hold_s` passes."""
        self._paused_until = self.clock() + hold_s
        asyncio.get_running_loop().call_later(hold_s, self._pump)

    def retry_after(self) -> float:
        """Seconds until the queue ahead drains at the measured dispatch rate (1-60)."""
        rate = self._decayed_rate(self.clock())
        if rate <= 0:
            return 1.0
        return float(min(60, max(1, math.ceil((self.waiting + 1) / rate))))

    def depth(self) -> dict[tuple[int, str], int]:
        """Live waiters by (priority, tenant)."""
        out: dict[tuple[int, str], int] = {}
        for priority, band in self._bands.items():
            for tenant, queue in band.tenants.items():
                n = sum(1 for w in queue if not w.gone)
                if n:
                    out[(priority, tenant)] = n
        return out

    # -- internals -----------------------------------------------------------------------------------
    def _has_room(self) -> bool:
        if self.clock() < self._paused_until:
            return False
        cap = self.capacity()
        return cap is None or self.inflight < cap

    def _due_before(self, priority: int) -> bool:
        """Whether a waiter of this band or a higher one could take a slot now (it goes first)."""
        if not self.waiting:
            return False
        return any(
            self._within_share(tenant)
            for p, band in self._bands.items()
            if p <= priority
            for tenant in band.tenants
        )

    def _within_share(self, tenant: str) -> bool:
        """Whether `tenant` may take one more slot: it holds less than its share of the room."""
        cap = self.capacity()
        if cap is None:
            return True
        return self._held.get(tenant, 0) < max(1, math.ceil(cap * self.config.max_tenant_share))

    def _grant(self, waited_s: float, tenant: str) -> Slot:
        self.inflight += 1
        held = self._held.get(tenant, 0)
        self._held[tenant] = held + 1
        self.counts["dispatched"] += 1
        now = self.clock()
        self._rate = self._decayed_rate(now) + 1.0 / RATE_HALF_LIFE_S * math.log(2)
        self._rate_at = now
        self._changed()
        return Slot(self, waited_s, tenant, held if self.config.tenant_rank else 0)

    def _decayed_rate(self, now: float) -> float:
        return self._rate * 0.5 ** ((now - self._rate_at) / RATE_HALF_LIFE_S)

    def _release(self, tenant: str) -> None:
        self.inflight -= 1
        if (held := self._held.get(tenant, 0) - 1) > 0:
            self._held[tenant] = held
        else:
            self._held.pop(tenant, None)
        self._paused_until = 0.0
        self._pump()
        self._changed()

    def _leave(self, w: _Waiter) -> bool:
        """Take a waiter out of the queue (lazily: its turn is skipped); False if it was granted."""
        if w.future.done():
            return False
        w.gone = True
        w.future.cancel()
        self.waiting -= 1
        return True

    def _pump(self) -> None:
        while self.waiting and self._has_room():
            w = self._next()
            if w is None:
                break
            self.waiting -= 1
            w.future.set_result(self._grant(self.clock() - w.arrival, w.tenant))

    def _next(self) -> _Waiter | None:
        """The next waiter to dispatch: highest band first; inside it, round-robin over the tenants
        still within their share (a band whose tenants all hold their share lets a lower one through)."""
        for priority in sorted(self._bands):
            band = self._bands[priority]
            w = band.pop(self._within_share)
            if not band.tenants:
                del self._bands[priority]
            if w is not None:
                return w
        return None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)
