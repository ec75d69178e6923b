"""Clients coming back from a NATS restart (real nats-server killed and restarted on its port): they
do not take the others' slower return for their death."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from helpers import heartbeat
from nats.errors import NoRespondersError

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
from kvmesh.services.router.workers import MISSED_BEATS


async def until(check, what: str, timeout: float = 30.0) -> None:
    """Poll `check` until true: a hang guard (the bound is generous), not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def reconnects(*buses: Bus) -> Callable[[], Awaitable[None]]:
    """Taken before a kill: waits until each bus has reconnected since. nats-py calls back (setting
    `reconnected_at`) only once it has re-sent its subscriptions, its reply inbox's too, and flushed:
    the server holds them by then."""
    marks = [b.reconnected_at for b in buses]

    async def wait() -> None:
        await until(
            lambda: all(b.reconnected_at > m for b, m in zip(buses, marks, strict=True)), "reconnects"
        )

    return wait


async def test_no_responders_right_after_a_reconnect_means_not_back_yet(infra):
    client = await Bus.connect(infra.nats_url, "client")
    server = await Bus.connect(infra.nats_url, "server")
    refused = asyncio.Event()  # the client has been told "no responders" since the restart
    plain_request = client.nc.request

    async def request(*args, **kwargs):
        try:
            return await plain_request(*args, **kwargs)
        except NoRespondersError:
            refused.set()
            raise

    client.nc.request = request
    try:
        back = reconnects(client, server)
        infra.kill("nats")
        infra.restart("nats")
        await back()

        async def answer(_req, _raw) -> DetokenizeReply:
            return DetokenizeReply(text="back")

        async def late_subscriber() -> None:  # a service whose subscription comes back after the request
            await refused.wait()
            await server.serve("test.late", DetokenizeRequest, answer)

        task = asyncio.create_task(late_subscriber())
        try:
            reply = await client.request(
                "test.late", DetokenizeRequest(token_ids=[1]), DetokenizeReply, timeout=5
            )
        finally:
            refused.set()  # the subscriber task ends whatever happened
            await task
        assert reply.text == "back", "after 'no responders' the request was tried again and answered"
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
        await until(lambda: "w" in router.registry.workers, "the router heard the worker's beat")
        seen = router.registry.workers["w"]
        silent_until = seen.last_seen + MISSED_BEATS * seen.interval_s  # its expiry, were it not forgiven
        back = reconnects(bus, client)
        infra.kill("nats")
        # The outage outlasts the worker's missed-beat allowance (nothing can be heard meanwhile).
        await until(lambda: time.monotonic() > silent_until, "the worker's silence outlasted its beats")
        infra.restart("nats")
        await back()
        # the worker's next beat is not here yet; its silence was the outage's, not its death
        reply = await client.request(Subjects.ROUTER_ROUTE, req, RouteResult, timeout=5)
        assert isinstance(reply, RouteReply) and reply.worker_id == "w", reply
    finally:
        await bus.close()
        await client.close()
