"""Router scoring and worker expiry (pure logic; the e2e tests run the real service)."""

import asyncio
import time

from helpers import heartbeat

from kvmesh.schemas.messages import ErrorReply, RouteReply, RouteRequest
from kvmesh.services.router.service import RouterConfig, RouterService


def beat(router: RouterService, wid: str, outstanding: int, now: float, interval: float = 1.0) -> None:
    router.registry.beat(heartbeat(wid, outstanding, interval_s=interval), now=now)


def route(router: RouterService, n: int = 100, exclude: list[str] | None = None):
    req = RouteRequest(request_id="r", num_tokens=n, max_tokens=50, exclude=exclude or [])
    return asyncio.run(router.route(req))


def test_least_outstanding_tokens_wins_and_assignments_count_until_the_next_beat(monkeypatch):
    router = RouterService(RouterConfig(nats_url="", seed=0))
    monkeypatch.setattr("time.monotonic", lambda: 10.0)
    beat(router, "a", 500, now=10.0)
    beat(router, "b", 100, now=10.0)
    first = route(router, n=1000)
    assert isinstance(first, RouteReply) and first.worker_id == "b" and first.reason == "load"
    # b now carries 100 + 1050 assigned tokens: the next request goes to a
    assert route(router).worker_id == "a"
    beat(router, "b", 0, now=10.0)  # a fresh beat replaces the local estimate
    assert route(router).worker_id == "b"


def test_ties_are_broken_at_random(monkeypatch):
    monkeypatch.setattr("time.monotonic", lambda: 0.0)
    picks = set()
    for seed in range(20):
        router = RouterService(RouterConfig(nats_url="", seed=seed))
        for w in ("a", "b", "c"):
            beat(router, w, 0, now=0.0)
        picks.add(route(router).worker_id)
    assert picks == {"a", "b", "c"}


def test_silent_workers_expire_and_exclusions_apply(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr("time.monotonic", lambda: clock["t"])
    router = RouterService(RouterConfig(nats_url=""))
    beat(router, "a", 0, now=0.0, interval=0.5)
    beat(router, "b", 0, now=0.0, interval=0.5)
    assert route(router, exclude=["a"]).worker_id == "b"
    clock["t"] = 1.0
    beat(router, "b", 0, now=1.0, interval=0.5)
    clock["t"] = 1.6  # a: silent for 3.2 intervals -> dropped; b: 1.2 intervals -> alive
    assert route(router).worker_id == "b" and set(router.registry.workers) == {"b"}
    assert route(router).reason == "only"
    reply = route(router, exclude=["b"])
    assert isinstance(reply, ErrorReply) and reply.code == "no_workers"


def test_kv_aware_scoring_trades_prefix_against_load_and_keeps_sessions(monkeypatch):
    from kvmesh.services.router.scoring import KVAwareScorer
    from kvmesh.services.router.workers import WorkerInfo

    monkeypatch.setattr("time.monotonic", lambda: 0.0)
    router = RouterService(RouterConfig(nats_url="", seed=0))
    beat(router, "a", 300, now=0.0)  # busier, but holds the prompt
    beat(router, "b", 0, now=0.0)
    held = {"a": 60}  # 60 blocks of 16 = 960 of the prompt's 1,000 tokens

    async def fake_overlap(_req):
        return held

    router.overlap = fake_overlap
    req = RouteRequest(request_id="r", num_tokens=1000, max_tokens=10, session_id="s1")
    reply = asyncio.run(router.route(req))
    assert (reply.worker_id, reply.reason) == ("a", "prefix"), "960 cached tokens beat 300 queued"
    assert router.hit_tokens == router.available_hit_tokens == 960

    held.clear()  # nothing cached anywhere: b is idler, but a ran this session's last turn
    a, b = router.registry.workers["a"], router.registry.workers["b"]
    gap = a.load_tokens - b.load_tokens  # 300 queued + the 1,010 just assigned
    small = RouteRequest(request_id="r2", num_tokens=10, max_tokens=10, session_id="s1")
    sticky, loose = KVAwareScorer(session_bonus=gap + 100), KVAwareScorer(session_bonus=gap - 100)
    assert sticky.score(small, a, 0, True).value < sticky.score(small, b, 0, False).value
    assert loose.score(small, a, 0, True).value > loose.score(small, b, 0, False).value
    assert isinstance(a, WorkerInfo) and router.sessions["s1"] == "a"


async def test_without_the_kv_index_routing_goes_on_by_load_and_health_says_so(nats_url):
    from kvmesh.libs.bus import Bus
    from kvmesh.schemas.messages import RouteResult, RouterHealth, RouterHealthRequest, Subjects

    router = RouterService(RouterConfig(nats_url=nats_url, seed=0))
    bus, client = await Bus.connect(nats_url, "router"), await Bus.connect(nats_url, "client")
    await router.attach(bus)
    for w, load in (("a", 50), ("b", 0)):
        beat(router, w, load, now=time.monotonic())
    req = RouteRequest(request_id="r", num_tokens=64, max_tokens=8, block_hashes=[1, 2, 3, 4])
    reply = await client.request(Subjects.ROUTER_ROUTE, req, RouteResult)  # no kv-index is running
    assert isinstance(reply, RouteReply) and (reply.worker_id, reply.reason) == ("b", "load")
    health = await client.request(Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth)
    assert health.kv_index_ok is False and health.workers == ["a", "b"] and health.decisions == {"load": 1}
    await bus.close()
    await client.close()
