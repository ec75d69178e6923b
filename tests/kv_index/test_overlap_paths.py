"""The overlap query's two paths on real Redis: few holders of a prompt's first block (one set
lookup per holder) and many (a walk down the chain); both must give every worker's leading run."""

import time

import pytest
from redis.asyncio import Redis

from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.prefix_index import FAST_PATH_HOLDERS
from kvmesh.schemas.kv_events import BlockRemoved, BlockStored, KVEventBatch
from kvmesh.services.kv_index.index import KVIndex

BS = 4


@pytest.fixture
async def index(redis_url):
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    yield KVIndex(redis, encode_extra_keys("m"), hash_seed(None))
    await redis.aclose()


async def store(index: KVIndex, worker: str, tokens: list[int]) -> None:
    """Index `tokens` as one BlockStored of `worker` (engine hashes = our keys, for simplicity)."""
    keys = hash_blocks(tokens, BS, index.extra_keys, index.seed)
    event = BlockStored(block_hashes=keys, parent_block_hash=None, token_ids=tokens, block_size=BS)
    await index.apply(worker, KVEventBatch(ts=time.time(), events=[event]))


@pytest.mark.parametrize("holders", [2, FAST_PATH_HOLDERS + 4])
async def test_every_holder_gets_its_leading_run_on_both_paths(index, holders):
    prompt = list(range(100, 100 + 10 * BS))  # 10 blocks
    keys = hash_blocks(prompt, BS, index.extra_keys, index.seed)
    for i in range(holders):
        await store(index, f"w{i}", prompt[: (i % 5 + 6) * BS])  # w_i holds 6..10 blocks
    await store(index, "other", list(range(900, 900 + 10 * BS)))  # another prompt entirely
    expect = {f"w{i}": i % 5 + 6 for i in range(holders)}
    assert await index.overlap(keys) == expect
    # a hole in w0's chain cuts its run there, whatever follows
    await index.apply("w0", KVEventBatch(ts=time.time(), events=[BlockRemoved(block_hashes=[keys[2]])]))
    assert await index.overlap(keys) == expect | {"w0": 2}
    # nobody holds the first block: nobody holds any prefix
    assert await index.overlap([12345, *keys[1:]]) == {}
