"""One KV contract end to end, on a real mesh whose workers use blocks of 32 tokens (only the
workers are told: the tokenizer, the router and the kv-index take the block size from the contract
the workers publish). The router's cached-token counts equal the workers' own `cached_tokens`;
salted tenants (`cache_salt` in the body or the `X-Cache-Salt` header) share no block, while the same
salt and unsalted requests still hit; a worker started with another block size is refused by the
router, in its log and its metrics. A mesh of its own serving the tiny random model (milliseconds
per step, a fast start); the odd worker is a simulated one, in this process."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.libs.bus import Bus
from kvmesh.libs.launcher import Mesh, MeshConfig
from kvmesh.schemas.messages import (
    EncodeReply,
    EncodeRequest,
    EncodeResult,
    OverlapRequest,
    OverlapResult,
    RouteRequest,
    RouteResult,
    RouterHealth,
    RouterHealthRequest,
    Subjects,
)
from kvmesh.services.sim_worker.core import SimEngineConfig
from kvmesh.services.sim_worker.fleet import FleetConfig, SimFleet
from kvmesh.services.sim_worker.timing import load_profile

BLOCK = 32
HEARTBEAT_S = 0.5
# only the workers are told the block size; no NIXL (no disaggregation here): a faster start
WORKER_ARGS = ["--block-size", str(BLOCK), "--kv-cache-gb", "0.02", "--no-nixl"]
WORKER_ARGS += ["--heartbeat-interval", str(HEARTBEAT_S)]
PROMPT = "Tell me about the weather. " + " ".join(f"Fact {i}: the sky is blue today." for i in range(12))
HIT = "kvmesh:router_prefix_hit_tokens_total"
REFUSED = "kvmesh:router_workers_refused_total"


@pytest.fixture(scope="module")
def contract_mesh(tiny_chat_model_path, tmp_path_factory):
    config = MeshConfig(
        model=str(tiny_chat_model_path),
        dtype="float32",
        num_workers=2,
        worker_args=WORKER_ARGS,
        router_args=["--warmup-s", "0.5"],
        log_dir=tmp_path_factory.mktemp("contract-mesh-logs"),
    )
    with Mesh(config) as mesh:
        mesh.wait_ready(timeout=120)
        yield mesh


def counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).raise_for_status().text):
        for s in family.samples:
            if s.name == HIT:
                out[HIT] = out.get(HIT, 0.0) + s.value
            elif s.name == REFUSED:
                out[f"{REFUSED}{{{s.labels['reason']}}}"] = s.value
    return out


async def _encode(nats_url: str, salt: str | None) -> EncodeReply:
    bus = await Bus.connect(nats_url, "test-contract")
    try:
        req = EncodeRequest(request_id="t", prompt=PROMPT, cache_salt=salt)
        reply = await bus.request(Subjects.TOKENIZER_ENCODE, req, EncodeResult)
        assert isinstance(reply, EncodeReply), reply
        return reply
    finally:
        await bus.close()


async def _until_routed_by_prefix(nats_url: str, enc: EncodeReply) -> dict[str, int]:
    """Until the kv-index and then the router's replica of the index hold the prompt; the
    kv-index's overlap (worker -> blocks). Returns after the workers' next heartbeats, which wipe
    the load the probes added to the holder in the router's eyes."""
    bus = await Bus.connect(nats_url, "test-contract-route")
    try:
        deadline = time.monotonic() + 15
        overlap = OverlapRequest(block_hashes=enc.block_hashes)
        while not (held := (await bus.request(Subjects.KV_INDEX_OVERLAP, overlap, OverlapResult)).overlap):
            assert time.monotonic() < deadline, "the kv-index never held the prompt"
            await asyncio.sleep(0.05)
        route = RouteRequest(
            request_id="probe",
            num_tokens=len(enc.token_ids),
            max_tokens=0,
            block_hashes=enc.block_hashes,
            block_size=enc.block_size,
        )
        while (reply := await bus.request(Subjects.ROUTER_ROUTE, route, RouteResult)).reason != "prefix":
            assert time.monotonic() < deadline, f"never routed by prefix: {reply}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(HEARTBEAT_S * 1.5)
        return held
    finally:
        await bus.close()


def _complete(mesh: Mesh, salt: str | None = None, header: bool = False) -> tuple[int, int]:
    """One completion of PROMPT: (prompt tokens, cached tokens) from its usage."""
    body: dict = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    headers = {}
    if salt is not None and header:
        headers["X-Cache-Salt"] = salt
    elif salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(f"{mesh.base_url}/v1/completions", json=body, headers=headers, timeout=60)
    usage = r.raise_for_status().json()["usage"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def test_block_size_32_end_to_end_exact_counts_and_salted_tenants(contract_mesh):
    mesh = contract_mesh
    router = mesh.metrics_urls["router"]
    plain = asyncio.run(_encode(mesh.nats_url, None))
    salted = asyncio.run(_encode(mesh.nats_url, "tenant-a"))
    assert plain.block_size == BLOCK and len(plain.block_hashes) == len(plain.token_ids) // BLOCK >= 3
    assert not set(plain.block_hashes) & set(salted.block_hashes), "salted prompts share no block"

    def measured(salt: str | None = None, header: bool = False) -> tuple[int, float]:
        before = counters(router)[HIT]
        prompt_tokens, cached = _complete(mesh, salt, header)
        assert prompt_tokens == len(plain.token_ids)
        return cached, counters(router)[HIT] - before

    cached, predicted = measured()  # the first one: nothing cached anywhere
    assert cached == predicted == 0
    held = asyncio.run(_until_routed_by_prefix(mesh.nats_url, plain))
    assert list(held.values()) == [len(plain.block_hashes)], held  # the kv-index, in blocks of 32
    exact = (len(plain.token_ids) - 1) // BLOCK * BLOCK
    assert measured() == (exact, exact), "unsalted requests share; the router predicts it exactly"
    assert measured("tenant-a") == (0, 0), "a salted tenant gets nothing of the unsalted cache"
    asyncio.run(_until_routed_by_prefix(mesh.nats_url, salted))
    assert measured("tenant-a", header=True) == (exact, exact), "the same salt (as a header) shares"
    assert measured("tenant-b") == (0, 0), "another tenant's salt shares nothing"


async def _router_workers(nats_url: str) -> list[str]:
    bus = await Bus.connect(nats_url, "test-contract-health")
    try:
        reply = await bus.request(Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth)
        return reply.workers
    finally:
        await bus.close()


def test_a_worker_with_another_block_size_is_refused_visibly(contract_mesh):
    """A simulated worker (the worker's own service, heartbeats and KV events) hashing in blocks of
    16, run in this process: refused by the router (counted once, logged, never listed)."""
    mesh = contract_mesh
    router = mesh.metrics_urls["router"]
    before = counters(router).get(f"{REFUSED}{{block_size}}", 0.0)
    fleet = SimFleet(
        FleetConfig(
            nats_url=mesh.nats_url,
            count=1,
            id_prefix="odd",
            engine=SimEngineConfig(model=mesh.config.model, block_size=16, num_kv_blocks=64),
            profile=load_profile(),
            heartbeat_interval_s=0.2,
        )
    )

    async def run() -> list[str]:
        stop = asyncio.Event()
        await fleet.start(stop)
        try:
            deadline = time.monotonic() + 15
            while counters(router).get(f"{REFUSED}{{block_size}}", 0.0) == before:
                assert time.monotonic() < deadline, "the router never refused the odd worker"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.6)  # a few more beats: refused once, counted once
            return await _router_workers(mesh.nats_url)
        finally:
            stop.set()
            await fleet.close()

    listed = asyncio.run(run())
    assert counters(router)[f"{REFUSED}{{block_size}}"] == before + 1
    assert sorted(listed) == sorted(mesh.worker_ids), listed
    router_log = (mesh.config.log_dir / "router.log").read_text()
    assert "refused worker odd-0: its KV contract differs in block_size" in router_log
