"""Clients coming back from a NATS restart (real nats-server killed and restarted on its port): they
do not take the others' slower return for their death."""

from __future__ import annotations

import asyncio
import time

from helpers import heartbeat

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import (
    DetokenizeReply,
    DetokenizeRequest,
    Heartbeat,
    RouteReply,
    RouteRequest,
    RouteResult,
    Subjects,
)
from kvmesh.services.router.service import RouterConfig, RouterService


async def reconnected(*buses: Bus) -> None:
    for _ in range(200):
        if all(b.nc.is_connected for b in buses):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never reconnected")


async def test_no_responders_right_after_a_reconnect_means_not_back_yet(infra):
    client = await Bus.connect(infra.nats_url, "client")
    server = await Bus.connect(infra.nats_url, "server")
    try:
        infra.kill("nats")
        infra.restart("nats")
        await reconnected(client)
        await asyncio.sleep(0.2)  # nats-py re-subscribes its reply inbox just after it says connected

        async def answer(_req, _raw) -> DetokenizeReply:
            return DetokenizeReply(text="back")

        async def late_subscriber() -> None:  # a service whose own reconnect comes half a second later
            await asyncio.sleep(0.5)
            await reconnected(server)
            await server.serve("test.late", DetokenizeRequest, answer)

        task = asyncio.create_task(late_subscriber())
        reply = await client.request(
            "test.late", DetokenizeRequest(token_ids=[1]), DetokenizeReply, timeout=5
        )
        assert reply.text == "back"
        await task
    finally:
        await client.close()
        await server.close()


def _beat(worker: str) -> Heartbeat:
    return heartbeat(worker, ts=time.time(), interval_s=0.1)


async def test_the_router_does_not_drop_workers_for_the_silence_of_a_nats_outage(infra):
    router = RouterService(RouterConfig(nats_url=infra.nats_url, seed=0))
    bus = await Bus.connect(infra.nats_url, "router")
    client = await Bus.connect(infra.nats_url, "client")
    try:
        await router.attach(bus)
        await client.publish(Subjects.WORKER_HEARTBEAT, _beat("w"))
        req = RouteRequest(request_id="r", num_tokens=8, max_tokens=1)
        for _ in range(100):
            if router.registry.workers:
                break
            await asyncio.sleep(0.02)
        infra.kill("nats")
        await asyncio.sleep(0.5)  # five heartbeat intervals with nothing heard
        infra.restart("nats")
        await reconnected(bus, client)
        # the worker's next beat is not here yet; its silence was the outage's, not its death
        reply = await client.request(Subjects.ROUTER_ROUTE, req, RouteResult, timeout=5)
        assert isinstance(reply, RouteReply) and reply.worker_id == "w", reply
    finally:
        await bus.close()
        await client.close()
