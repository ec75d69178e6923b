"""The router reading the KV index straight from Redis (--index redis): the same overlaps as the
kv-index service gives, and routing by load, saying so, when Redis does not answer."""

import time

from helpers import heartbeat
from redis.asyncio import Redis

from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.launcher import free_port
from kvmesh.schemas.kv_events import BlockStored, KVEventBatch
from kvmesh.schemas.messages import RouteReply, RouteRequest
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.router.service import RouterConfig, RouterService


def beat(router: RouterService, wid: str, outstanding: int) -> None:
    router.registry.beat(heartbeat(wid, outstanding))


async def test_routes_by_the_index_in_redis_and_by_load_without_it(redis_url):
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    extra, seed = encode_extra_keys("m"), hash_seed(None)
    tokens = list(range(500, 500 + 64))
    ev = BlockStored(
        block_hashes=[1, 2, 3, 4], parent_block_hash=None, token_ids=tokens, block_size=16
    )  # the engine's own hashes: the index re-derives its keys
    await KVIndex(redis, extra, seed).apply("b", KVEventBatch(ts=time.time(), events=[ev]))
    req = RouteRequest(
        request_id="r",
        num_tokens=70,
        max_tokens=4,
        block_hashes=hash_blocks([*tokens, 1, 2, 3, 4, 5, 6], 16, extra, seed),
    )

    router = RouterService(RouterConfig(nats_url="", seed=0, index_redis_url=redis_url))
    beat(router, "a", 0)
    beat(router, "b", 30)  # busier, but holds 64 of the 70 prompt tokens
    reply = await router.route(req)
    assert isinstance(reply, RouteReply) and (reply.worker_id, reply.reason) == ("b", "prefix")
    assert router.index_ok and router.hit_tokens == 64

    dead = RouterService(
        RouterConfig(nats_url="", seed=0, index_redis_url=f"redis://127.0.0.1:{free_port()}")
    )
    beat(dead, "a", 0)
    beat(dead, "b", 30)
    reply = await dead.route(req)
    assert isinstance(reply, RouteReply) and (reply.worker_id, reply.reason) == ("a", "load")
    assert dead.index_ok is False and dead.health().kv_index_ok is False
    await redis.aclose()
