"""`GET /ready` on the real gateway app over a real nats-server, with no mesh behind it: 503 (OpenAI error
shape) until a serving worker's heartbeat arrives, 200 while one keeps beating, 503 again once it is
silent. `/health` (liveness) is 200 throughout. A prefill worker alone does not make it ready."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest
import pytest_asyncio

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import Heartbeat, Subjects, WorkerStats
from kvmesh.services.gateway.app import create_app
from kvmesh.services.gateway.config import GatewayConfig
from kvmesh.services.gateway.flow import FlowController
from kvmesh.services.gateway.readiness import Readiness

pytestmark = pytest.mark.asyncio(loop_scope="module")

HANG_GUARD_S = 10.0


def beat(worker_id: str, role: str, interval_s: float) -> Heartbeat:
    stats = WorkerStats(
        worker_id=worker_id,
        role=role,
        model="m",
        num_running=0,
        num_waiting=0,
        num_blocks=8,
        num_free_blocks=8,
        kv_usage=0.0,
        outstanding_tokens=0,
    )
    return Heartbeat(stats=stats, ts=time.time(), interval_s=interval_s)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(gateway_nats_url, tokenizer, served_model):
    gateway_bus = await Bus.connect(gateway_nats_url, "gateway")
    workers_bus = await Bus.connect(gateway_nats_url, "stand-in-workers")
    config = GatewayConfig(nats_url=gateway_nats_url, model=str(served_model.path))
    app = create_app(config, gateway_bus, tokenizer, served_model)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10) as client:
        yield client, workers_bus
    await workers_bus.close()
    await gateway_bus.close()


async def ready_status(client: httpx.AsyncClient, want: int, publish=None) -> httpx.Response:
    """GET /ready until it answers `want` (heartbeats arrive asynchronously), publishing `publish()`
    before each try; the last answer when the hang guard runs out."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        if publish is not None:
            await publish()
        r = await client.get("/ready")
        if r.status_code == want or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.02)


async def test_ready_follows_serving_workers_heartbeats(gateway):
    client, workers = gateway
    r = await client.get("/ready")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "service_unavailable_error" and err["code"] == "not_ready"
    assert "no worker" in err["message"]
    assert (await client.get("/health")).status_code == 200, "liveness does not depend on workers"

    async def decode_worker_beats() -> None:
        await workers.publish(Subjects.WORKER_HEARTBEAT, beat("worker-0", "aggregated", 0.2))

    r = await ready_status(client, 200, decode_worker_beats)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "workers": ["worker-0"]}

    # Silent for 3 intervals (0.6 s): gone, as the router would drop it.
    r = await ready_status(client, 503)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "not_ready"


async def test_a_prefill_worker_alone_is_not_ready():
    """Readiness reads the workers flow control heard (one heartbeat subscription in the gateway)."""
    now = [0.0]
    flow = FlowController(clock=lambda: now[0])
    bus = SimpleNamespace(nc=SimpleNamespace(is_connected=True))
    readiness = Readiness(bus, flow, watch=None)  # type: ignore[arg-type]
    flow.observe(beat("prefill-0", "prefill", 1.0).stats, interval_s=1.0)
    now[0] = 0.5
    assert readiness.reason_not_ready() is not None
    now[0] = 0.0
    flow.observe(beat("decode-0", "decode", 1.0).stats, interval_s=1.0)
    now[0] = 0.5
    assert readiness.reason_not_ready() is None
    assert readiness.serving_workers() == ["decode-0"]
    now[0] = 3.5
    assert readiness.serving_workers() == [], "silent for 3 intervals: gone"
