"""A worker's waiting queue is bounded: beyond --max-waiting it answers `overloaded` (the gateway tries
another worker or answers 429), except for a migrated request, which the mesh had admitted already.
Its status subject tells whether it still holds a request (request migration's liveness probe).
Real NATS, tiny model."""

import asyncio

import msgspec

from kvmesh.libs.bus import Bus, decode
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.schemas.messages import (
    AbortRequest,
    ErrorReply,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    RequestStatusQuery,
    RequestStatusReply,
    SamplingOptions,
    StatsRequest,
    StreamMessage,
    Subjects,
    TokenChunk,
    WorkerStats,
)
from kvmesh.services.worker.service import WorkerConfig, WorkerService


def generate(rid: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=[5, 6, 7, 8, 9],
        sampling=SamplingOptions(max_tokens=5000, temperature=0, ignore_eos=True),
        stream_subject=Subjects.stream(rid),
    )


async def test_bounded_waiting_queue_and_status(nats_url, tiny_model_path):
    # one running slot: everything after the first request waits
    cfg = EngineConfig(
        model=str(tiny_model_path), dtype="float32", block_size=4, num_kv_blocks=4096, max_num_seqs=1
    )
    llm = AsyncLLM(lambda: LLMEngine(cfg, load_tokenizer=False))
    await llm.ready()
    worker_bus, client = await Bus.connect(nats_url, "worker"), await Bus.connect(nats_url, "client")
    config = WorkerConfig(nats_url=nats_url, worker_id="wa", model="tiny", max_waiting=2)
    await WorkerService(config, llm).attach(worker_bus)

    async def submit(req: GenerateRequest):
        return await client.request(Subjects.worker("wa", "generate"), req, GenerateResult, timeout=10)

    async def running(rid: str) -> bool:
        query = RequestStatusQuery(request_id=rid)
        reply = await client.request(Subjects.worker("wa", "status"), query, RequestStatusReply, timeout=10)
        return reply.running

    streams = {}
    for rid in ("r0", "r1", "r2", "r4"):
        _sub, streams[rid] = await client.subscribe_queue(Subjects.stream(rid))

    async def last_message(rid: str):
        """The request's last stream message (a running one streams tokens until it is aborted)."""
        for _ in range(5001):  # at most 5000 chunks (max_tokens), then the end
            msg = decode((await asyncio.wait_for(streams[rid].get(), 30)).data, StreamMessage)
            if not isinstance(msg, TokenChunk):
                return msg
        raise AssertionError(f"{rid}: no end after max_tokens")

    async def engine_running() -> int:
        stats = await client.request(Subjects.worker("wa", "stats"), StatsRequest(), WorkerStats, timeout=10)
        return stats.num_running

    # Accepted at once, r0 counts as waiting until the engine's next step has taken it: wait for that
    # (a hang-guarded poll of the worker's own stats), so that r1 and r2 fill the waiting queue.
    replies = [await submit(generate("r0"))]
    for _ in range(300):
        if await engine_running() == 1:
            break
        await asyncio.sleep(0.02)
    assert await engine_running() == 1
    replies += [await submit(generate(f"r{i}")) for i in (1, 2)]  # 1 running + 2 waiting
    assert all(isinstance(r, GenerateAccepted) for r in replies), replies
    refused = await submit(generate("r3"))
    assert isinstance(refused, ErrorReply) and refused.code == "overloaded"
    moved = await submit(msgspec.structs.replace(generate("r4"), migrated=True))
    assert isinstance(moved, GenerateAccepted), "a migrated request is not refused"
    assert await running("r0") and await running("r4") and not await running("r3")

    for rid in ("r0", "r1", "r2", "r4"):
        await client.publish(Subjects.worker("wa", "abort"), AbortRequest(request_id=rid))
    for rid in ("r0", "r1", "r2", "r4"):
        assert isinstance(await last_message(rid), Finished), rid
        # The worker lets go of a request as it publishes its Finished: asked after it, it says so.
        assert not await running(rid), f"{rid} still held after its Finished"
    assert isinstance(await submit(generate("r5")), GenerateAccepted), "room again once they are gone"
    await client.publish(Subjects.worker("wa", "abort"), AbortRequest(request_id="r5"))
    llm.shutdown()
    await worker_bus.close()
    await client.close()
