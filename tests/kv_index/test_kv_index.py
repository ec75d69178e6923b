"""The kv-index on real Redis and real NATS/JetStream, fed by real engines' KV events."""

import asyncio
import time

import msgspec
import pytest
from helpers import heartbeat
from redis.asyncio import Redis

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.schemas.kv_events import BlockRemoved, KVEventBatch
from kvmesh.schemas.messages import (
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    Subjects,
)
from kvmesh.services.kv_index.index import KVIndex
from kvmesh.services.kv_index.service import KVIndexService
from kvmesh.services.worker.kv_events import KVEventPublisher

BS = 4


@pytest.fixture
async def setup(nats_url, redis_url, tiny_model_path):
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    extra = encode_extra_keys(tiny_model_path.name)
    service = KVIndexService(KVIndex(redis, extra, hash_seed(None)))
    bus = await Bus.connect(nats_url, "kv-index")
    await service.attach(bus)
    yield service, bus, extra
    await service.close()
    await bus.close()
    await redis.aclose()


async def run_worker(nats_url, tiny_model_path, worker_id: str, prompts: list[list[int]]):
    cfg = EngineConfig(model=str(tiny_model_path), dtype="float32", block_size=BS, num_kv_blocks=64)
    llm = AsyncLLM(lambda: LLMEngine(cfg, load_tokenizer=False))
    await llm.ready()
    bus = await Bus.connect(nats_url, worker_id)
    pub = KVEventPublisher(bus, worker_id, llm.take_kv_events, interval_s=0.01)
    await pub.start()
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    for i, p in enumerate(prompts):
        async for _ in llm.generate(f"{worker_id}-{i}", p, SamplingParams(max_tokens=1, temperature=0)):
            pass
    await asyncio.sleep(0.05)
    stop.set()
    await task
    llm.shutdown()
    await bus.close()


async def overlap(bus, hashes) -> dict[str, int]:
    for _ in range(100):  # events arrive asynchronously
        reply = await bus.request(
            Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=hashes), OverlapResult
        )
        assert isinstance(reply, OverlapReply)
        if reply.overlap:
            return reply.overlap
        await asyncio.sleep(0.05)
    return {}


async def test_two_workers_events_give_per_worker_overlap(setup, nats_url, tiny_model_path):
    service, bus, extra = setup
    shared = [7 + i for i in range(8)]  # two full blocks
    p_a = shared + [100 + i for i in range(9)]  # a: 4 full blocks of its prompt
    p_b = shared + [200 + i for i in range(5)]  # b: shares the first two blocks only
    await run_worker(nats_url, tiny_model_path, "wa", [p_a])
    await run_worker(nats_url, tiny_model_path, "wb", [p_b])
    seed = hash_seed(None)
    query = hash_blocks([*p_a, 1, 2, 3, 4], BS, extra, seed)  # a follow-up turn of conversation a
    got = await overlap(bus, query)
    for _ in range(50):
        if got == {"wa": 4, "wb": 2}:
            break
        await asyncio.sleep(0.05)
        got = await overlap(bus, query)
    assert got == {"wa": 4, "wb": 2}

    # a removed block stops being reported: wa evicts its third block
    await service.index.apply(
        "wa", KVEventBatch(ts=time.time(), events=[BlockRemoved(block_hashes=[query[2]])])
    )
    assert await service.index.overlap(query) == {"wa": 2, "wb": 2}

    # a worker whose heartbeats stop disappears from the index
    await bus.publish(Subjects.WORKER_HEARTBEAT, heartbeat("wb", ts=time.time(), interval_s=0.05))
    await asyncio.sleep(0.3)
    assert "wb" in await service.expire()
    assert await service.index.overlap(query) == {"wa": 2}


async def test_stock_vllm_event_format_is_ingested(setup):
    """Bytes exactly as vLLM's publisher encodes them: array-like tagged structs, bytes hashes."""
    service, _bus, extra = setup
    tokens = list(range(300, 312))  # three blocks of 4
    vllm_hashes = [b"\x01" * 32, b"\x02" * 32, b"\x03" * 32]  # vLLM's own (sha256) hashes
    raw = msgspec.msgpack.encode(
        [time.time(), [["BlockStored", vllm_hashes, None, tokens, BS, None, "GPU"]], None]
    )
    await service.on_batch("vllm-0", 0, raw)
    ours = hash_blocks(tokens, BS, extra, hash_seed(None))
    assert await service.index.overlap(ours) == {"vllm-0": 3}
    removed = msgspec.msgpack.encode([time.time(), [["BlockRemoved", [vllm_hashes[1]], "GPU"]]])
    await service.on_batch("vllm-0", 1, removed)
    assert await service.index.overlap(ours) == {"vllm-0": 1}


async def test_a_sequence_gap_resyncs_the_worker(setup):
    service, _bus, extra = setup
    tokens = list(range(400, 408))
    raw = msgspec.msgpack.encode([time.time(), [["BlockStored", [11, 12], None, tokens, BS, None, None]]])
    await service.on_batch("wg", 0, raw)
    ours = hash_blocks(tokens, BS, extra, hash_seed(None))
    assert await service.index.overlap(ours) == {"wg": 2}
    await service.on_batch("wg", 5, msgspec.msgpack.encode([time.time(), []]))  # 1..4 were lost
    assert service.resyncs == 1 and await service.index.overlap(ours) == {}
