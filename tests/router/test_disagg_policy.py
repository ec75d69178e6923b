"""Conditional disaggregation in the router (pure logic; tests/disagg runs it on real workers)."""

import asyncio

from helpers import heartbeat

from kvmesh.schemas.messages import RouteRequest
from kvmesh.services.router.service import RouterConfig, RouterService


def beat(router: RouterService, wid: str, role: str, outstanding: int = 0) -> None:
    router.registry.beat(heartbeat(wid, outstanding, role, interval_s=60.0))


def route(router: RouterService, n: int):
    return asyncio.run(router.route(RouteRequest(request_id="r", num_tokens=n, max_tokens=10)))


def test_prefill_workers_never_serve_and_only_long_prompts_go_remote():
    router = RouterService(RouterConfig(nats_url="", seed=0, disagg_min_tokens=512))
    beat(router, "d", "decode")
    beat(router, "p", "prefill")
    short = route(router, 200)
    assert (short.worker_id, short.prefill_worker_id, short.prefill_reason) == ("d", None, "short")
    long = route(router, 2000)
    assert (long.worker_id, long.prefill_worker_id, long.prefill_reason) == ("d", "p", "remote")
    assert router.health().decisions["prefill_remote"] == 1
    assert router.health().decisions["prefill_short"] == 1


def test_a_saturated_prefill_pool_prefills_locally_and_the_least_loaded_prefill_worker_wins():
    config = RouterConfig(nats_url="", seed=0, disagg_min_tokens=100, disagg_max_queue_tokens=5000)
    router = RouterService(config)
    beat(router, "d", "decode")
    beat(router, "p1", "prefill", outstanding=6000)
    beat(router, "p2", "prefill", outstanding=4000)
    first = route(router, 1000)
    assert (first.prefill_worker_id, first.prefill_reason) == ("p2", "remote")
    # p2 now carries 4000 + 1000 assigned tokens: the pool is saturated until the next beats
    second = route(router, 1000)
    assert (second.worker_id, second.prefill_worker_id, second.prefill_reason) == ("d", None, "prefill_busy")


def test_only_prefill_workers_alive_means_no_worker():
    router = RouterService(RouterConfig(nats_url="", seed=0))
    beat(router, "p", "prefill")
    reply = route(router, 1000)
    assert reply.code == "no_workers"


def test_an_aggregated_mesh_never_disaggregates():
    router = RouterService(RouterConfig(nats_url="", seed=0, disagg_min_tokens=1))
    beat(router, "a", "aggregated")
    reply = route(router, 4000)
    assert reply.prefill_worker_id is None and "prefill_no_prefill_workers" not in router.health().decisions
