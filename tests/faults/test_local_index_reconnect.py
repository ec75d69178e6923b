"""The router's local index across a NATS restart (real nats-server stopped and restarted on its port,
JetStream store kept): it subscribes again from the last event it applied and follows new events."""

from __future__ import annotations

import asyncio
import time
import uuid

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.schemas.kv_events import BlockStored
from kvmesh.services.router.service import RouterConfig, RouterService
from kvmesh.services.worker.kv_events import KVEventPublisher

EXTRA, SEED = encode_extra_keys("m"), hash_seed(None)


async def until(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def stored(tokens: list[int]) -> BlockStored:
    keys = hash_blocks(tokens, 16, EXTRA, SEED)
    return BlockStored(block_hashes=keys, parent_block_hash=None, token_ids=tokens, block_size=16)


async def test_the_local_index_follows_the_stream_again_after_a_nats_restart(infra):
    wid = f"rw-{uuid.uuid4().hex[:6]}"
    before, after = list(range(36_000, 36_032)), list(range(37_000, 37_048))
    router = RouterService(RouterConfig(nats_url=infra.nats_url, index="local", index_extra_keys=EXTRA))
    bus = await Bus.connect(infra.nats_url, "router")
    pub_bus = await Bus.connect(infra.nats_url, wid)
    local = router.local_index

    async def beating() -> None:
        # As the router hears a live worker's heartbeats: this test is about following the stream,
        # and a publisher slow to reconnect on a loaded machine must not count as a dead worker.
        while True:
            local.beat(wid, 1.0)
            await asyncio.sleep(0.2)

    beats = asyncio.create_task(beating())
    try:
        await router.attach(bus)
        pub = KVEventPublisher(pub_bus, wid, list)
        await pub.start()
        await pub.publish([stored(before)])

        async def holds(tokens: list[int], n: int) -> bool:
            return local.overlap(hash_blocks(tokens, 16, EXTRA, SEED)) == {wid: n}

        await until(lambda: holds(before, 2))
        applied = local.applied_seq
        # A graceful restart (SIGTERM: nats-server writes its JetStream store out before it exits); the
        # stream comes back from the store with its messages and its creation time (its identity).
        nats = infra.proc("nats")
        nats.terminate()
        nats.wait(timeout=30)
        infra.restart("nats")

        async def published() -> bool:  # the publisher's own reconnect may come a little later
            try:
                await pub.publish([stored(after)])
                return True
            except Exception:
                return False

        await until(published)
        await until(lambda: holds(after, 3))
        # The same stream came back (its store kept): the replica read on after the last message it
        # applied, keeping what it held, rather than emptying itself and reading the stream again.
        assert await holds(before, 2), "the blocks announced before the restart are still held"
        assert local.rereads == 0, "it read on from its last message (no re-read from the stream's start)"
        assert local.applied_seq > applied and local.feed.resyncs == 0
        assert await router.check_index()
    finally:
        beats.cancel()
        await router.close()
        await bus.close()
        await pub_bus.close()
