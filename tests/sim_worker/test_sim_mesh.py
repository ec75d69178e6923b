"""Simulated workers on real NATS (JetStream) and Redis, with the real router and kv-index: they
register by heartbeat, their KV events build the index, a repeated prefix is routed back to them
and served from their cache; the CLI runs dozens of them in one process."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

from redis.asyncio import Redis

from kvmesh.libs.bus import Bus, decode
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.schemas.messages import (
    Finished,
    GenerateRequest,
    GenerateResult,
    Heartbeat,
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    RouteReply,
    RouteRequest,
    RouteResult,
    SamplingOptions,
    StreamMessage,
    Subjects,
    TokenChunk,
)
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.kv_index.service import KVIndexService
from kvmesh.services.router.service import RouterConfig, RouterService
from kvmesh.services.sim_worker.core import SimEngineConfig
from kvmesh.services.sim_worker.fleet import FleetConfig, SimFleet
from kvmesh.services.sim_worker.timing import TimingProfile

MODEL = "SmolLM2-135M-Instruct"
FAST = TimingProfile(  # ms-scale steps: the protocol is under test here, not the timings
    prefill_base_s=0.002,
    prefill_s_per_token=1e-5,
    decode_batch_sizes=[1, 8],
    decode_step_s=[0.002, 0.003],
)


async def until(predicate, timeout: float = 15.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await predicate():
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


async def generate(bus: Bus, worker_id: str, rid: str, tokens: list[int]) -> tuple[list[int], Finished]:
    """What the gateway does: subscribe to the stream, ask the worker, read chunks to Finished."""
    sub, queue = await bus.subscribe_queue(Subjects.stream(rid))
    req = GenerateRequest(
        request_id=rid,
        token_ids=tokens,
        sampling=SamplingOptions(max_tokens=4, temperature=0),
        stream_subject=Subjects.stream(rid),
    )
    accepted = await bus.request(Subjects.worker(worker_id, "generate"), req, GenerateResult)
    assert getattr(accepted, "worker_id", None) == worker_id, accepted
    out: list[int] = []
    while True:
        msg = decode((await asyncio.wait_for(queue.get(), 10)).data, StreamMessage)
        if isinstance(msg, TokenChunk):
            assert msg.first_index == len(out)
            out += msg.token_ids
        else:
            assert isinstance(msg, Finished), msg
            await sub.unsubscribe()
            return out, msg


async def test_sim_workers_register_feed_the_index_and_serve_repeated_prefixes_from_cache(
    nats_url, redis_url
):
    redis = Redis.from_url(redis_url)
    seed = hash_seed(None)
    extra = encode_extra_keys(MODEL)
    index = KVIndexService(KVIndex(redis, extra, seed))
    router = RouterService(RouterConfig(nats_url=nats_url, seed=0))
    index_bus, router_bus, client = [await Bus.connect(nats_url, n) for n in ("kv-index", "router", "client")]
    await index.attach(index_bus)
    await router.attach(router_bus)
    prefix = f"simtest-{uuid.uuid4().hex[:6]}"
    fleet = SimFleet(
        FleetConfig(
            nats_url=nats_url,
            count=3,
            id_prefix=prefix,
            engine=SimEngineConfig(model=MODEL, num_kv_blocks=128),
            profile=FAST,
            heartbeat_interval_s=0.2,
            kv_events_interval_s=0.01,
        )
    )
    stop = asyncio.Event()
    await fleet.start(stop)
    try:
        ids = set(fleet.worker_ids)

        async def registered():
            return ids <= {w.stats.worker_id for w in router.registry.live()}

        await until(registered)

        tokens = [*range(1000, 1064), 7, 8, 9]  # 4 full blocks + 3 tokens
        hashes = hash_blocks(tokens, 16, extra, seed)
        route = RouteRequest(request_id="r1", num_tokens=len(tokens), max_tokens=4, block_hashes=hashes)
        first = await client.request(Subjects.ROUTER_ROUTE, route, RouteResult)
        assert isinstance(first, RouteReply) and first.worker_id in ids
        out1, fin1 = await generate(client, first.worker_id, f"{prefix}-a", tokens)
        assert len(out1) == 4 and fin1.num_cached_tokens == 0 and fin1.finish_reason == "length"

        async def indexed():
            reply = await client.request(
                Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=hashes), OverlapResult
            )
            assert isinstance(reply, OverlapReply)
            return reply.overlap if reply.overlap.get(first.worker_id) == 4 else None

        assert await until(indexed) == {first.worker_id: 4}, "only the worker that ran it holds the prefix"

        async def beat_since():  # the router counts r1 as load on its worker until its next heartbeat
            return router.registry.workers[first.worker_id].assigned_tokens == 0

        await until(beat_since)
        follow_up = [*tokens[:64], 10, 11, 12, 13]  # same 4 blocks, another question
        second = await client.request(
            Subjects.ROUTER_ROUTE,
            RouteRequest(
                request_id="r2",
                num_tokens=len(follow_up),
                max_tokens=4,
                block_hashes=hash_blocks(follow_up, 16, extra, seed),
            ),
            RouteResult,
        )
        assert isinstance(second, RouteReply) and (second.worker_id, second.reason) == (
            first.worker_id,
            "prefix",
        )
        _, fin2 = await generate(client, second.worker_id, f"{prefix}-b", follow_up)
        assert fin2.num_cached_tokens == 64, "the repeated prefix came from the worker's prefix cache"
        out3, _ = await generate(client, first.worker_id, f"{prefix}-c", tokens)
        assert out3 == out1, "greedy outputs are a function of the prompt"
    finally:
        stop.set()
        await fleet.close()
        for bus in (index_bus, router_bus, client):
            await bus.close()
        await redis.aclose()


async def test_the_cli_runs_dozens_of_sim_workers_in_one_process(nats_url):
    """64 workers in one process: each beats under its own id and answers on its own subjects."""
    prefix = f"cli-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "KVMESH_THREADS": "1"}
    argv = [sys.executable, "-m", "kvmesh.services.sim_worker", "--count", "64", "--id-prefix", prefix]
    argv += ["--nats-url", nats_url, "--heartbeat-interval", "0.5", "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, env=env)
    bus = await Bus.connect(nats_url, "test")
    try:
        _sub, beats = await bus.subscribe_queue(Subjects.WORKER_HEARTBEAT)
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 64 and time.monotonic() < deadline:
            assert proc.poll() is None, "the sim worker process died"
            try:
                raw = await asyncio.wait_for(beats.get(), 1.0)
            except TimeoutError:
                continue
            wid = decode(raw.data, Heartbeat).stats.worker_id
            if wid.startswith(prefix):
                seen.add(wid)
        assert seen == {f"{prefix}-{i}" for i in range(64)}
        from kvmesh.schemas.messages import StatsRequest, WorkerStats

        stats = await bus.request(Subjects.worker(f"{prefix}-63", "stats"), StatsRequest(), WorkerStats)
        assert stats.worker_id == f"{prefix}-63" and stats.num_blocks == 2048
    finally:
        await bus.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
