"""Flow control's queue as pure logic (services/gateway/flow.py): capacity from the workers' reports,
priority bands, round-robin between tenants, the bounds (queue size, TTL) and a client that leaves."""

from __future__ import annotations

import asyncio

import pytest
from helpers import worker_stats

from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.flow import DEFAULT_MAX_RUNNING, FlowConfig, FlowController


def flow_with_room(room: int, **config) -> FlowController:
    """A controller whose one worker runs at most `room` requests (no headroom)."""
    flow = FlowController(FlowConfig(worker_headroom=0, **config))
    flow.observe(worker_stats("w0", max_running=room), interval_s=60)
    return flow


async def queued(flow: FlowController, n: int, **kw) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(flow.wait(**kw)) for _ in range(n)]
    await asyncio.sleep(0)  # each enters the queue (no timing: one pass of the loop)
    return tasks


def test_capacity_follows_the_workers_reports():
    flow = FlowController(FlowConfig(worker_headroom=4))
    assert flow.capacity() is None  # nobody reported: the gate is open
    flow.observe(worker_stats("w0", max_running=8), interval_s=60)
    flow.observe(worker_stats("w1"), interval_s=60)  # no bound reported: the engine's default
    assert flow.capacity() == (8 + 4) + (DEFAULT_MAX_RUNNING + 4)
    flow.observe(worker_stats("w1", max_running=8, num_running=6, kv_usage=0.99), interval_s=60)
    assert flow.capacity() == 12 + 6  # a nearly full KV cache takes nothing beyond what it runs
    flow.observe(worker_stats("p0", role="prefill", max_running=100), interval_s=60)
    assert flow.capacity() == 18  # prefill workers serve no client
    stale = FlowController(FlowConfig(), clock=lambda: 0.0)
    stale.observe(worker_stats("w0", max_running=8), interval_s=1)
    stale.clock = lambda: 3.5  # three missed beats
    assert stale.capacity() is None


async def test_within_room_at_once_beyond_it_waits_until_a_slot_comes_back():
    flow = flow_with_room(2)
    a, b = flow.try_admit(), flow.try_admit()
    assert a is not None and b is not None and flow.try_admit() is None
    (c,) = await queued(flow, 1)
    assert not c.done() and flow.waiting == 1
    a.release()
    a.release()  # idempotent
    slot = await c
    assert flow.inflight == 2 and flow.waiting == 0 and slot.waited_s >= 0


async def test_higher_priority_goes_first_whatever_the_arrival():
    flow = flow_with_room(1)
    held = flow.try_admit()
    order: list[str] = []

    async def request(name: str, priority: int) -> None:
        slot = await flow.wait(priority=priority)
        order.append(name)
        slot.release()

    tasks = [asyncio.create_task(request(n, p)) for n, p in [("low1", 5), ("low2", 5), ("high", -1)]]
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["high", "low1", "low2"]


async def test_tenants_take_turns_so_a_burst_does_not_starve_a_trickle():
    flow = flow_with_room(1)
    held = flow.try_admit()
    order: list[str] = []

    async def request(tenant: str, i: int) -> None:
        slot = await flow.wait(tenant=tenant)
        order.append(f"{tenant}{i}")
        slot.release()

    tasks = [asyncio.create_task(request("A", i)) for i in range(6)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(request("B", i)) for i in range(2)]  # arrives behind A's burst
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["A0", "B0", "A1", "B1", "A2", "A3", "A4", "A5"]


async def test_a_full_queue_is_429_with_retry_after():
    flow = flow_with_room(1, max_queue=2)
    held = flow.try_admit()
    waiting = await queued(flow, 2)
    with pytest.raises(GatewayError) as err:
        flow.try_admit()
    assert err.value.status == 429 and err.value.code == "overloaded" and err.value.retry_after >= 1
    assert flow.counts["rejected_full"] == 1
    held.release()
    (await waiting[0]).release()
    (await waiting[1]).release()


async def test_a_burst_beyond_room_and_queue_is_refused_on_arrival_before_any_work():
    flow = flow_with_room(2, max_queue=1)
    on_the_way = [flow.arrive() for _ in range(3)]  # 2 will find room, 1 a place in the queue
    with pytest.raises(GatewayError) as err:
        flow.arrive()  # still being tokenized, the first three already fill room and queue
    assert err.value.status == 429 and flow.counts["rejected_full"] == 1
    on_the_way[0].done()
    on_the_way[0].done()  # idempotent
    held = flow.try_admit()  # the first reaches the workers
    assert held is not None and flow.arriving == 2
    with pytest.raises(GatewayError):
        flow.arrive()  # 1 room left + 1 queue place, 2 still on their way
    for a in on_the_way[1:]:
        a.done()
    assert flow.arriving == 0
    flow.arrive().done()  # places again
    held.release()


async def test_no_queue_means_429_as_soon_as_the_workers_are_full():
    flow = flow_with_room(1, max_queue=0)
    assert flow.try_admit() is not None
    with pytest.raises(GatewayError):
        flow.try_admit()


async def test_past_the_ttl_it_is_429_and_leaves_the_queue():
    flow = flow_with_room(1)
    held = flow.try_admit()
    with pytest.raises(GatewayError) as err:
        await flow.wait(ttl_s=0.05)
    assert err.value.status == 429 and "queue" in err.value.message
    assert flow.waiting == 0 and flow.counts["rejected_ttl"] == 1 and flow.depth() == {}
    held.release()
    assert flow.inflight == 0


async def test_a_client_that_leaves_is_dropped_and_its_turn_skipped():
    flow = flow_with_room(1)
    held = flow.try_admit()
    gone, stays = await queued(flow, 2, tenant="t")
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert flow.waiting == 1 and flow.counts["dropped"] == 1 and flow.depth() == {(0, "t"): 1}
    held.release()
    slot = await stays
    assert flow.inflight == 1
    slot.release()
    assert flow.inflight == 0 and flow.counts["dispatched"] == 2


async def test_retry_after_is_the_measured_drain_time():
    now = [0.0]
    flow = FlowController(FlowConfig(worker_headroom=0), clock=lambda: now[0])
    flow.observe(worker_stats("w0", max_running=1), interval_s=1e6)
    assert flow.retry_after() == 1.0  # nothing measured yet
    for _ in range(20):  # 2 dispatches a second for 10 s
        flow.try_admit().release()
        now[0] += 0.5
    waiting = await queued(flow, 10)
    held = flow.try_admit() if flow.inflight == 0 else None
    assert 3 <= flow.retry_after() <= 12  # ~11 requests ahead at ~1-2 per second (decayed estimate)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    if held is not None:
        held.release()


async def test_no_tenant_holds_more_than_its_share_of_the_room():
    flow = flow_with_room(16)  # share 7/8: 14 slots for one tenant, 2 kept for the others
    a = [flow.try_admit(tenant="A") for _ in range(14)]
    assert all(s is not None for s in a) and flow.try_admit(tenant="A") is None
    (a_waits,) = await queued(flow, 1, tenant="A")
    b = flow.try_admit(tenant="B")  # a newcomer starts at once, though A waits
    assert b is not None and not a_waits.done()
    b.release()
    assert not a_waits.done()  # B's slot does not go to A beyond its share
    a[0].release()
    (await a_waits).release()
    for slot in a[1:]:
        slot.release()
    assert flow.inflight == 0


async def test_a_tenant_at_its_share_lets_the_next_tenant_and_band_through():
    flow = flow_with_room(8)  # share: 7
    held = [flow.try_admit(tenant="A") for _ in range(7)]
    (high_a,) = await queued(flow, 1, tenant="A", priority=0)
    (low_b,) = await queued(flow, 1, tenant="B", priority=9)
    slot = await low_b  # the last slot goes to B's lower band: A is at its share
    assert not high_a.done()
    held[0].release()
    (await high_a).release()
    slot.release()
    for s in held[1:]:
        s.release()


def test_a_slot_carries_its_tenants_load_for_the_workers_scheduler():
    """The worker's engine schedules by (band, tenant's requests in flight at dispatch): a tenant's
    n-th concurrent slot says n-1, another tenant's first says 0, and a released slot stops counting."""
    flow = flow_with_room(8)
    a = [flow.try_admit(tenant="A") for _ in range(3)]
    assert [s.tenant_inflight for s in a] == [0, 1, 2]
    b = flow.try_admit(tenant="B")
    assert b is not None and b.tenant_inflight == 0
    a[0].release()
    assert flow.try_admit(tenant="A").tenant_inflight == 2


def test_the_workers_rank_a_tenants_load_by_class_so_its_own_requests_keep_their_order():
    from kvmesh.schemas.messages import GenerateRequest, SamplingOptions
    from kvmesh.services.worker.wire import rank_of

    def rank(priority: int, inflight: int) -> tuple[int, int]:
        req = GenerateRequest(
            request_id="r", token_ids=[1], sampling=SamplingOptions(max_tokens=1), stream_subject="s",
            priority=priority, tenant_inflight=inflight,
        )  # fmt: skip
        return rank_of(req)

    assert rank(0, 0) < rank(0, 1) < rank(0, 2) < rank(0, 4) < rank(0, 59)  # a newcomer first
    assert rank(0, 58) == rank(0, 59) == rank(0, 33)  # one burst's requests: one class, FCFS
    assert rank(-1, 60) < rank(0, 0)  # the band first


async def test_a_full_queue_refuses_a_generation_request_before_reading_its_body():
    """The gate answers 429 from the request's head alone (flow_gate.py); other routes pass."""
    from kvmesh.services.gateway.flow_gate import FlowGate

    flow = flow_with_room(1, max_queue=0)
    assert flow.try_admit() is not None  # the one slot is taken, and nobody may wait
    passed: list[str] = []

    async def inner(scope, receive, send) -> None:
        passed.append(scope["path"])

    async def unread() -> dict:
        raise AssertionError("the body was read")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    gate = FlowGate(inner, flow, frozenset({"/v1/chat/completions"}))
    await gate({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, unread, send)
    assert sent[0]["status"] == 429 and dict(sent[0]["headers"])[b"retry-after"]
    assert b'"code": "overloaded"' in sent[1]["body"] and flow.counts["rejected_full"] == 1
    await gate({"type": "http", "method": "GET", "path": "/v1/models"}, unread, send)
    assert passed == ["/v1/models"]
