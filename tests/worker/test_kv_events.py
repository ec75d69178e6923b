"""A worker's KV events reach JetStream: vLLM-shaped batches, per-worker sequence numbers, block
hashes identical to what the tokenizer computes for the same prompt."""

import asyncio

import msgspec

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockStored, KVEventBatch
from kvmesh.services.worker.kv_events import SEQ_HEADER, STREAM, KVEventPublisher


async def test_events_are_published_in_order_with_the_tokenizers_hashes(nats_url, tiny_model_path):
    cfg = EngineConfig(model=str(tiny_model_path), dtype="float32", block_size=4, num_kv_blocks=32)
    llm = AsyncLLM(lambda: LLMEngine(cfg, load_tokenizer=False))
    await llm.ready()
    bus = await Bus.connect(nats_url, "test-worker")
    publisher = KVEventPublisher(bus, "w-test", llm.take_kv_events, interval_s=0.01)
    await publisher.start()
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))

    prompt = [5 + i for i in range(10)]
    async for _ in llm.generate("r1", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)):
        pass
    await asyncio.sleep(0.1)
    stop.set()
    await task

    js = bus.nc.jetstream()
    sub = await js.subscribe("kvmesh.kv.events.w-test", stream=STREAM, ordered_consumer=True)
    batches, seqs = [], []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except Exception:
            break
        seqs.append(int(msg.headers[SEQ_HEADER]))
        batches.append(msgspec.msgpack.decode(msg.data, type=KVEventBatch))
    assert seqs == list(range(len(seqs))) and len(seqs) >= 2
    assert batches[0].events == [AllBlocksCleared()], "a (re)started worker first clears its entries"
    stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    expected = hash_blocks(prompt, 4, encode_extra_keys(tiny_model_path.name), hash_seed(None))
    assert hashes[:2] == expected, "the index can match the tokenizer's hashes to the worker's blocks"
    assert stored[0].token_ids[:8] == prompt[:8] and stored[0].parent_block_hash is None
    llm.shutdown()
    await bus.close()
