"""A real mesh for end-to-end tests: nats-server, tokenizer, router, two workers and the gateway,
each its own process, on free ports."""

from __future__ import annotations

import asyncio

import openai
import pytest

from kvmesh.libs.launcher import Mesh, MeshConfig


@pytest.fixture(scope="package")
def mesh(default_model_path, tmp_path_factory) -> Mesh:
    config = MeshConfig(
        model=str(default_model_path),
        dtype="float32",  # token-for-token comparisons with the in-process engine (see the README)
        num_workers=2,
        worker_args=["--kv-cache-gb", "0.25", "--heartbeat-interval", "0.5"],
        log_dir=tmp_path_factory.mktemp("mesh-logs"),
    )
    with Mesh(config) as m:
        m.wait_ready(timeout=180)
        yield m


async def _worker_stats(mesh: Mesh, worker_id: str):
    from kvmesh.libs.bus import Bus
    from kvmesh.schemas.messages import StatsRequest, Subjects, WorkerStats

    bus = await Bus.connect(mesh.nats_url, "test")
    try:
        return await bus.request(Subjects.worker(worker_id, "stats"), StatsRequest(), WorkerStats, timeout=5)
    finally:
        await bus.close()


@pytest.fixture
def worker_stats(mesh):
    """worker_stats(worker_id) -> WorkerStats, asked over NATS (runs its own event loop: call it from
    sync tests or through asyncio.to_thread)."""
    return lambda worker_id: asyncio.run(_worker_stats(mesh, worker_id))


@pytest.fixture(scope="module")
def client(mesh):
    """The official OpenAI client on the mesh's gateway."""
    return openai.OpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
