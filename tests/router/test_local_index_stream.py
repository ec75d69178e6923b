"""The router's local index (`--index local`) on real NATS JetStream, fed by the workers' own
publisher: it catches up by replaying events published before it started, routes by them, follows
removals, resyncs a worker after a sequence gap, drops a worker whose heartbeats stop, and without
JetStream routes by load and says so. Then with real simulated workers and the kv-index beside it:
the same overlaps as the kv-index's Redis."""

import asyncio
import time
import uuid

from helpers import heartbeat
from redis.asyncio import Redis

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.libs.launcher import free_port, start_nats_server
from kvmesh.schemas.kv_events import BlockRemoved, BlockStored
from kvmesh.schemas.messages import (
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    RouteReply,
    RouteRequest,
    Subjects,
)
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.kv_index.service import KVIndexService
from kvmesh.services.router.service import RouterConfig, RouterService
from kvmesh.services.sim_worker.core import SimEngineConfig
from kvmesh.services.sim_worker.fleet import FleetConfig, SimFleet
from kvmesh.services.sim_worker.timing import TimingProfile
from kvmesh.services.worker.kv_events import STREAM, KVEventPublisher

MODEL = "SmolLM2-135M-Instruct"
EXTRA, SEED = encode_extra_keys(MODEL), hash_seed(None)


async def until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await predicate() if asyncio.iscoroutinefunction(predicate) else predicate():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def stored(tokens: list[int]) -> BlockStored:
    """Blocks as our workers publish them (their engine hash is ours)."""
    return BlockStored(
        block_hashes=hash_blocks(tokens, 16, EXTRA, SEED),
        parent_block_hash=None,
        token_ids=tokens,
        block_size=16,
    )


def local_router(nats_url: str) -> RouterService:
    return RouterService(RouterConfig(nats_url=nats_url, seed=0, index="local", index_extra_keys=EXTRA))


async def test_local_index_replays_follows_resyncs_and_expires(nats_url):
    wid = f"lw-{uuid.uuid4().hex[:6]}"
    tokens = list(range(33_000, 33_064))  # 4 blocks (token ranges apart from other tests' prompts)
    query = hash_blocks(tokens, 16, EXTRA, SEED)
    pub_bus = await Bus.connect(nats_url, wid)
    pub = KVEventPublisher(pub_bus, wid, list)
    await pub.start()  # sequence 0: AllBlocksCleared
    await pub.publish([stored(tokens)])  # before the router exists: it must catch up by replay

    router = local_router(nats_url)
    bus = await Bus.connect(nats_url, "router")
    try:
        await router.attach(bus)
        await until(router.check_index)
        assert router.local_index.overlap(query) == {wid: 4}
        router.registry.beat(heartbeat(wid, outstanding_tokens=40))
        router.registry.beat(heartbeat("idle"))
        req = RouteRequest(request_id="r", num_tokens=70, max_tokens=4, block_hashes=query)
        reply = await router.route(req)
        assert isinstance(reply, RouteReply) and (reply.worker_id, reply.reason) == (wid, "prefix")

        await pub.publish([BlockRemoved(block_hashes=[query[2]])])  # a removed block stops being reported
        await until(lambda: router.local_index.overlap(query) == {wid: 2})

        other = list(range(35_000, 35_032))
        pub.seq += 2  # two batches lost: the worker's entries may be wrong, so they are dropped
        await pub.publish([stored(other)])
        await until(lambda: router.local_index.feed.resyncs == 1)
        assert router.local_index.overlap(query) == {}
        assert router.local_index.overlap(hash_blocks(other, 16, EXTRA, SEED)) == {wid: 2}

        # a worker whose heartbeats stop disappears from the index
        await pub_bus.publish(Subjects.WORKER_HEARTBEAT, heartbeat(wid, ts=time.time(), interval_s=0.05))
        await until(lambda: wid not in router.local_index.index.emap)
        assert router.local_index.overlap(hash_blocks(other, 16, EXTRA, SEED)) == {}
        router.local_index.index.check_integrity()
    finally:
        await router.close()
        await bus.close()
        await pub_bus.close()


async def test_without_jetstream_the_local_index_is_down_and_routing_goes_by_load(tmp_path):
    port = free_port()
    nats = start_nats_server(port)  # no store: no JetStream
    url = f"nats://127.0.0.1:{port}"
    router = local_router(url)
    bus = await Bus.connect(url, "router")
    try:
        await router.attach(bus)
        router.registry.beat(heartbeat("busy", outstanding_tokens=500))
        router.registry.beat(heartbeat("idle"))
        reply = await router.route(
            RouteRequest(request_id="r", num_tokens=64, max_tokens=4, block_hashes=[1, 2])
        )
        assert isinstance(reply, RouteReply) and (reply.worker_id, reply.reason) == ("idle", "load")
        assert router.health().kv_index_ok is False
    finally:
        await router.close()
        await bus.close()
        nats.terminate()
        nats.wait(10)


async def test_sim_workers_events_give_the_same_overlaps_locally_as_in_redis(nats_url, redis_url):
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    index = KVIndexService(KVIndex(redis, EXTRA, SEED))
    router = local_router(nats_url)
    buses = [await Bus.connect(nats_url, n) for n in ("kv-index", "router", "client")]
    await index.attach(buses[0])
    await router.attach(buses[1])
    client = buses[2]
    prefix = f"lsim-{uuid.uuid4().hex[:6]}"
    fleet = SimFleet(
        FleetConfig(
            nats_url=nats_url,
            count=2,
            id_prefix=prefix,
            engine=SimEngineConfig(model=MODEL, num_kv_blocks=64),
            profile=TimingProfile(
                prefill_base_s=0.001, prefill_s_per_token=1e-6, decode_batch_sizes=[1], decode_step_s=[0.001]
            ),
            heartbeat_interval_s=0.2,
            kv_events_interval_s=0.01,
        )
    )
    stop = asyncio.Event()
    await fleet.start(stop)
    try:
        # 3 tenants' 6-block prompts with 5-block questions: 64 blocks per worker cannot keep them all
        prompts = [
            [
                *range(40_000 + t * 1000, 40_000 + t * 1000 + 96),
                *range(45_000 + 100 * i, 45_000 + 100 * i + 80),
            ]
            for i, t in ((i, i % 3) for i in range(24))
        ]
        for i, tokens in enumerate(prompts):
            outputs = await fleet.workers[i % 2].llm.add_request(
                f"{prefix}-{i}", tokens, SamplingParams(max_tokens=1)
            )
            while not (await asyncio.wait_for(outputs.get(), 10)).finished:
                pass
        await asyncio.sleep(0.1)  # the fleet publishes its events every 10 ms
        last = (await client.nc.jetstream().stream_info(STREAM)).state.last_seq
        await until(lambda: min(index.applied_seq, router.local_index.applied_seq) >= last)
        for i, tokens in enumerate(prompts):
            q = hash_blocks(tokens, 16, EXTRA, SEED)
            remote = await client.request(
                Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=q), OverlapResult
            )
            assert isinstance(remote, OverlapReply) and router.local_index.overlap(q) == remote.overlap, i
        own = [
            router.local_index.overlap(hash_blocks(p, 16, EXTRA, SEED)).get(fleet.worker_ids[i % 2], 0)
            for i, p in enumerate(prompts)
        ]
        assert own[-1] == 11 and min(own) < 11, f"evictions were reported too: {own}"
        router.local_index.index.check_integrity()
    finally:
        stop.set()
        await fleet.close()
        await router.close()
        await index.close()
        for bus in buses:
            await bus.close()
        await redis.aclose()
