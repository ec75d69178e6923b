"""A worker told to stop finishes what it runs and refuses what is new (real NATS, tiny model)."""

import asyncio

import pytest

from kvmesh.libs.bus import Bus, NoResponders, decode
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.schemas.messages import (
    Finished,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    SamplingOptions,
    StreamMessage,
    Subjects,
    TokenChunk,
)
from kvmesh.services.worker.service import WorkerConfig, WorkerService


def generate(rid: str, n: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=[5, 6, 7, 8, 9],
        sampling=SamplingOptions(max_tokens=n, temperature=0, ignore_eos=True),
        stream_subject=Subjects.stream(rid),
    )


async def test_drain_finishes_running_requests_and_refuses_new_ones(nats_url, tiny_model_path):
    cfg = EngineConfig(model=str(tiny_model_path), dtype="float32", block_size=4, num_kv_blocks=256)
    llm = AsyncLLM(lambda: LLMEngine(cfg, load_tokenizer=False))
    await llm.ready()
    worker_bus, client = await Bus.connect(nats_url, "worker"), await Bus.connect(nats_url, "client")
    service = WorkerService(WorkerConfig(nats_url=nats_url, worker_id="wd", model="tiny"), llm)
    await service.attach(worker_bus)

    _sub, stream = await client.subscribe_queue(Subjects.stream("long"))
    accepted = await client.request(Subjects.worker("wd", "generate"), generate("long", 400), GenerateResult)
    assert isinstance(accepted, GenerateAccepted)
    drained = asyncio.create_task(service.drain(timeout_s=60))
    await asyncio.wait_for(service.refusing_new.wait(), 10)
    await worker_bus.nc.flush()  # a round trip after the UNSUB: the server has dropped the subscription
    with pytest.raises(NoResponders):
        await client.request(
            Subjects.worker("wd", "generate"), generate("late", 4), GenerateResult, timeout=2
        )

    tokens, final = 0, None
    for _ in range(401):  # at most 400 chunks (at least one token each), then Finished
        msg = decode((await asyncio.wait_for(stream.get(), 30)).data, StreamMessage)
        if not isinstance(msg, TokenChunk):
            final = msg
            break
        tokens += len(msg.token_ids)
    assert isinstance(final, Finished) and final.finish_reason == "length" and tokens == 400
    assert await drained == 0, "nothing had to be aborted"
    assert llm.stats.num_free_blocks == llm.stats.num_blocks
    llm.shutdown()
    await worker_bus.close()
    await client.close()
