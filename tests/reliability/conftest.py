"""A real mesh to break: nats-server, tokenizer, router, two float32 workers (greedy outputs comparable
token for token) and a gateway that checks silent streams every 0.5 s. Tests kill and restart its
workers (libs/launcher.py: Mesh.kill / Mesh.restart)."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmesh.libs.launcher import Mesh, MeshConfig


@pytest.fixture(scope="package")
def mesh(default_model_path, tmp_path_factory) -> Mesh:
    config = MeshConfig(
        model=str(default_model_path),
        dtype="float32",
        num_workers=2,
        worker_args=["--kv-cache-gb", "0.25", "--heartbeat-interval", "0.5"],
        gateway_args=["--liveness-interval", "0.5", "--probe-timeout", "1"],
        log_dir=tmp_path_factory.mktemp("reliability-logs"),
        metrics=False,
    )
    with Mesh(config) as m:
        m.wait_ready(timeout=180)
        yield m


async def wait_for_worker(mesh: Mesh, worker_id: str, timeout: float = 120) -> None:
    """Until the router lists `worker_id` as live (after a restart: once its engine is up)."""
    from kvmesh.libs.bus import Bus, BusError
    from kvmesh.schemas.messages import RouterHealth, RouterHealthRequest, Subjects

    bus = await Bus.connect(mesh.nats_url, "test-wait")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert mesh.proc(worker_id).poll() is None, f"{worker_id} exited"
            try:
                health = await bus.request(Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth, 2)
                if worker_id in health.workers:
                    return
            except BusError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{worker_id} did not come back")
    finally:
        await bus.close()
