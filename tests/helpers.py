"""Message factories shared by tests in several folders.

Import as `from helpers import ...`: pytest puts tests/ on sys.path, as the folder of tests/conftest.py.
"""

from __future__ import annotations

from kvmesh.schemas.messages import Heartbeat, WorkerStats


def worker_stats(
    worker_id: str, outstanding_tokens: int = 0, role: str = "aggregated", **fields: object
) -> WorkerStats:
    """An idle worker's stats (nothing running, 100 free blocks); `fields` set any other field."""
    base: dict[str, object] = {
        "worker_id": worker_id,
        "role": role,
        "model": "m",
        "num_running": 0,
        "num_waiting": 0,
        "num_blocks": 100,
        "num_free_blocks": 100,
        "kv_usage": 0.0,
        "outstanding_tokens": outstanding_tokens,
    }
    return WorkerStats(**(base | fields))


def heartbeat(
    worker_id: str,
    outstanding_tokens: int = 0,
    role: str = "aggregated",
    ts: float = 0.0,
    interval_s: float = 1e6,
) -> Heartbeat:
    """A heartbeat carrying `worker_stats(worker_id, outstanding_tokens, role)`; the default
    interval never expires within a test."""
    return Heartbeat(stats=worker_stats(worker_id, outstanding_tokens, role), ts=ts, interval_s=interval_s)


def restart_worker(mesh, worker_id: str, timeout: float = 240.0) -> None:
    """Start a stopped worker of a running `Mesh` again and return once it serves: it beats, answers
    /health, and the router lists it among the live workers (so the next request may go to it).
    Tests that stop a worker of a shared mesh call it to leave the mesh as they found it."""
    import asyncio
    import time

    from kvmesh.libs.bus import Bus
    from kvmesh.schemas.messages import RouterHealth, RouterHealthRequest, Subjects

    mesh.proc(worker_id).wait(60)
    mesh.restart(worker_id)
    deadline = time.monotonic() + timeout
    mesh.wait_ready(timeout=timeout)

    async def router_lists_it() -> bool:
        bus = await Bus.connect(mesh.nats_url, "test-restart")
        try:
            while time.monotonic() < deadline:  # the router hears the same heartbeats: moments at most
                health = await bus.request(
                    Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth, timeout=5
                )
                if worker_id in health.workers:
                    return True
                await asyncio.sleep(0.1)
            return False
        finally:
            await bus.close()

    assert asyncio.run(router_lists_it()), f"the router does not list {worker_id} after its restart"
