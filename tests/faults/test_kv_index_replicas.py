"""kv-index replicas side by side on a real redis-server and a real nats-server (JetStream), both of
which the tests kill and restart on their ports; KV events come from KVEventPublisher, fed recorded
events. One replica holds the write lease and applies the stream; all of them answer queries."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
from collections.abc import Awaitable, Callable

import pytest
from helpers import heartbeat
from redis.asyncio import Redis

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.launcher import Mesh, start_nats_server
from kvmesh.schemas.kv_events import BlockStored
from kvmesh.schemas.messages import (
    ErrorReply,
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    Subjects,
)
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.kv_index.lease import LEASE
from kvmesh.services.kv_index.service import KVIndexService
from kvmesh.services.worker.kv_events import STREAM, KVEventPublisher

BS = 4
EXTRA = encode_extra_keys("fault-test-model")
SEED = hash_seed(None)
LEASE_S = 0.6


class Cluster:
    """kv-index replicas, a test client and event publishers, all in this process."""

    def __init__(self, infra: Mesh) -> None:
        self.infra = infra
        self.replicas: list[KVIndexService] = []
        self.publishers: dict[str, KVEventPublisher] = {}
        self.client: Bus | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._engine_hash = itertools.count(1)

    async def start(self) -> None:
        redis = Redis.from_url(self.infra.redis_url)
        await redis.flushall()
        await redis.aclose()
        self.client = await Bus.connect(self.infra.nats_url, "test-client")
        self._closers.append(self.client.close)

    async def replica(self, name: str, silent_worker_s: float = 60.0) -> KVIndexService:
        redis = Redis.from_url(self.infra.redis_url, socket_connect_timeout=1, socket_timeout=2)
        service = KVIndexService(KVIndex(redis, EXTRA, SEED), name, LEASE_S, silent_worker_s)
        bus = await Bus.connect(self.infra.nats_url, name)
        await service.attach(bus)
        self.replicas.append(service)
        self._closers += [redis.aclose, bus.close, service.close]
        return service

    async def publisher(self, worker: str) -> KVEventPublisher:
        bus = await Bus.connect(self.infra.nats_url, worker)
        pub = KVEventPublisher(bus, worker, list)
        await pub.start()
        self.publishers[worker] = pub
        self._closers.append(bus.close)
        return pub

    async def store(self, worker: str, tokens: list[int]) -> list[int]:
        """`worker` caches the full blocks of `tokens` (one recorded BlockStored); our keys for them."""
        n = len(tokens) // BS
        engine_hashes = [next(self._engine_hash) for _ in range(n)]  # the publisher's own hashes
        event = BlockStored(
            block_hashes=engine_hashes, parent_block_hash=None, token_ids=tokens, block_size=BS
        )
        await self.publishers[worker].publish([event])
        return hash_blocks(tokens, BS, EXTRA, SEED)

    async def overlap(self, keys: list[int]) -> OverlapResult:
        assert self.client is not None
        return await self.client.request(
            Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=keys), OverlapResult, timeout=2
        )

    async def beat(self, worker: str) -> None:
        assert self.client is not None
        await self.client.publish(
            Subjects.WORKER_HEARTBEAT, heartbeat(worker, ts=time.time(), interval_s=0.2)
        )

    def leaders(self) -> list[KVIndexService]:
        return [r for r in self.replicas if r.is_leader]

    async def close(self) -> None:
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):  # a server the test killed
                await close()


@pytest.fixture
async def cluster(infra):
    c = Cluster(infra)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Poll `check` until true (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except Exception:  # a server is down or coming back
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def overlap_is(cluster: Cluster, keys: list[int], want: dict[str, int]):
    async def check() -> bool:
        reply = await cluster.overlap(keys)
        return isinstance(reply, OverlapReply) and reply.overlap == want

    return check


def tokens(base: int, blocks: int) -> list[int]:
    return [base + i for i in range(blocks * BS)]


async def test_one_replica_writes_and_a_crashed_leaders_successor_resumes_where_it_stopped(cluster):
    first = await cluster.replica("kvi-a")
    second = await cluster.replica("kvi-b")
    assert [r.replica_id for r in cluster.leaders()] == ["kvi-a"], "exactly one writer: the first to ask"
    await cluster.publisher("w1")
    keys1 = await cluster.store("w1", tokens(1000, 3))
    await until(overlap_is(cluster, keys1, {"w1": 3}), "the leader indexed w1's blocks")

    # Both replicas answer queries (they read the same Redis): ask each directly, then crash the leader
    # (no lease release, no unsubscribe drain: its process is gone).
    assert await first.index.overlap(keys1) == await second.index.overlap(keys1) == {"w1": 3}
    first._task.cancel()
    await first._stop_consuming()  # waits for a batch in progress to be recorded
    await first.bus.nc.close()
    first.is_leader = False
    applied_before = first.applied_seq

    # Events published while nobody leads wait in JetStream; the successor picks them up after the lease.
    keys2 = await cluster.store("w1", tokens(2000, 2))
    await until(
        overlap_is(cluster, keys2, {"w1": 2}), "the second replica took over and applied the new events"
    )
    assert second.is_leader
    assert second.rebuilds == 0, "it resumed from the recorded progress, not from the stream's start"
    assert second.applied_seq == applied_before + 1
    assert (await cluster.overlap(keys1)) == OverlapReply(overlap={"w1": 3})
    assert second.resyncs == 0, "per-worker sequence numbers carried over through Redis"


async def test_graceful_stop_hands_the_lease_over_at_once(cluster):
    first = await cluster.replica("kvi-c")
    second = await cluster.replica("kvi-d")
    await first.close()
    await until(lambda: _true(second.is_leader), "the standby took the released lease")
    await cluster.publisher("w2")
    keys = await cluster.store("w2", tokens(3000, 2))
    await until(overlap_is(cluster, keys, {"w2": 2}), "the new leader applies events")


async def _true(value: bool) -> bool:
    return value


async def test_redis_restarted_empty_is_rebuilt_from_the_stream(cluster, infra):
    leader = await cluster.replica("kvi-e")
    standby = await cluster.replica("kvi-f")
    await cluster.publisher("w3")
    keys_a = await cluster.store("w3", tokens(4000, 3))
    await until(overlap_is(cluster, keys_a, {"w3": 3}), "indexed before the fault")

    rebuilds = leader.rebuilds + standby.rebuilds  # the first leader replayed the stream at its start
    infra.kill("redis")
    reply = await cluster.overlap(keys_a)
    assert isinstance(reply, ErrorReply) and reply.code == "unavailable", reply
    keys_b = await cluster.store("w3", tokens(5000, 2))  # stored while Redis is down

    infra.restart("redis")  # same port, empty
    await until(overlap_is(cluster, keys_a, {"w3": 3}), "the index was rebuilt from the JetStream replay")
    await until(overlap_is(cluster, keys_b, {"w3": 2}), "events of the outage were applied too")
    assert leader.rebuilds + standby.rebuilds == rebuilds + 1, "one replica replayed the stream, once"
    assert len(cluster.leaders()) == 1
    redis = Redis.from_url(infra.redis_url)
    try:
        assert (await redis.get(LEASE)).decode() == cluster.leaders()[0].replica_id
    finally:
        await redis.aclose()


async def test_nats_restarted_the_leader_consumes_again(cluster, infra):
    leader = await cluster.replica("kvi-g")
    await cluster.publisher("w4")
    keys_a = await cluster.store("w4", tokens(6000, 2))
    await until(overlap_is(cluster, keys_a, {"w4": 2}), "indexed before the fault")
    applied, rebuilds = leader.applied_seq, leader.rebuilds

    infra.kill("nats")
    await asyncio.sleep(0.3)
    infra.restart("nats")  # same port, same JetStream store: the stream survives
    keys_b = []

    async def published() -> bool:  # the publisher's client reconnects on its own
        keys_b[:] = await cluster.store("w4", tokens(7000, 2))
        return True

    await until(published, "publishing again after the restart")
    await until(overlap_is(cluster, keys_b, {"w4": 2}), "the leader re-subscribed and applied new events")
    assert leader.is_leader and leader.applied_seq > applied
    assert leader.rebuilds == rebuilds, "it resumed after its last applied event (no replay from the start)"
    assert (await cluster.overlap(keys_a)) == OverlapReply(overlap={"w4": 2})


async def test_a_repeated_batch_is_not_a_gap(cluster):
    leader = await cluster.replica("kvi-h")
    pub = await cluster.publisher("w5")
    keys = await cluster.store("w5", tokens(8000, 2))
    await until(overlap_is(cluster, keys, {"w5": 2}), "indexed")
    pub.seq -= 1  # the same batch again, as a publish retried after a lost ack would send it
    await cluster.store("w5", tokens(8000, 2))
    keys2 = await cluster.store("w5", tokens(9000, 1))
    await until(overlap_is(cluster, keys2, {"w5": 1}), "the batch after it applied")
    assert leader.resyncs == 0
    assert (await cluster.overlap(keys)) == OverlapReply(overlap={"w5": 2})


async def test_a_dead_workers_replayed_events_expire(cluster):
    await cluster.publisher("ghost")
    ghost_keys = await cluster.store("ghost", tokens(10_000, 2))  # a worker that then died
    await cluster.publisher("alive")
    alive_keys = await cluster.store("alive", tokens(11_000, 2))
    stop = asyncio.Event()

    async def beating() -> None:
        while not stop.is_set():
            await cluster.beat("alive")
            await asyncio.sleep(0.1)

    beats = asyncio.create_task(beating())
    try:
        # a replica started afterwards replays both workers' events; only one of them beats
        await cluster.replica("kvi-i", silent_worker_s=1.0)
        await until(overlap_is(cluster, alive_keys, {"alive": 2}), "the replay indexed the beating worker")
        await until(overlap_is(cluster, ghost_keys, {}), "the silent worker was dropped")
        await asyncio.sleep(0.5)
        assert (await cluster.overlap(alive_keys)) == OverlapReply(overlap={"alive": 2})
    finally:
        stop.set()
        await beats


async def test_a_stream_lost_with_the_nats_store_is_recreated_and_read_from_its_start(
    cluster, infra, tmp_path
):
    leader = await cluster.replica("kvi-j")
    pub = await cluster.publisher("w6")
    keys_a = await cluster.store("w6", tokens(12_000, 2))
    await until(overlap_is(cluster, keys_a, {"w6": 2}), "indexed before the fault")

    # nats-server back on its port with an empty store: the stream and its sequence numbers are gone
    port = int(infra.nats_url.rsplit(":", 1)[1])
    infra.kill("nats")
    nats = next(p for p in infra.procs if p.name == "nats")
    nats.popen = start_nats_server(port, tmp_path / "new-store", stderr=subprocess.DEVNULL)
    try:

        async def recreated() -> bool:
            return bool(await cluster.client.nc.jetstream(timeout=0.5).stream_info(STREAM))

        await until(recreated, "a replica re-created the stream")
        keys_b = await cluster.store("w6", tokens(13_000, 2))  # the publisher's client reconnected meanwhile
        await until(overlap_is(cluster, keys_b, {"w6": 2}), "the leader reads the new stream from its start")
        assert (await cluster.overlap(keys_a)) == OverlapReply(overlap={"w6": 2}), "the index was kept"
        assert leader.resyncs == 0 and pub.seq == 3, "no batch lost or repeated across the two streams"
    finally:
        # Put the package's nats-server back on its own store. `infra.restart("nats")` respawns it there,
        # so a server left running on this store would be swapped for that one at the next test's
        # restart: a different stream (other messages, another creation time) behind the same port.
        infra.kill("nats")
        infra.restart("nats")
