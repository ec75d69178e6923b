"""A worker answers every generate request from its own event loop within milliseconds, whatever the
engine is doing: accepted (queued in the engine) or refused with a typed reason. Nothing waits for the
engine's next step boundary. Real NATS, tiny model; the engine thread is held busy on purpose."""

import asyncio
import threading

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.schemas.messages import (
    ErrorReply,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    SamplingOptions,
    Subjects,
)
from kvmesh.services.worker.service import WorkerConfig, WorkerService


def generate(rid: str, token_ids: list[int]) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=token_ids,
        sampling=SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True),
        stream_subject=Subjects.stream(rid),
    )


async def test_generate_is_answered_while_the_engine_thread_is_busy(nats_url, tiny_model_path):
    cfg = EngineConfig(model=str(tiny_model_path), dtype="float32", block_size=4, num_kv_blocks=256)
    llm = AsyncLLM(lambda: LLMEngine(cfg, load_tokenizer=False))
    await llm.ready()
    worker_bus, client = await Bus.connect(nats_url, "worker"), await Bus.connect(nats_url, "client")
    config = WorkerConfig(nats_url=nats_url, worker_id="busy", model="tiny", max_waiting=3)
    worker = WorkerService(config, llm)
    await worker.attach(worker_bus)
    held, release = threading.Event(), threading.Event()

    def long_step(_engine: LLMEngine) -> None:  # stands for a long prefill step
        held.set()
        release.wait(60)

    busy = asyncio.ensure_future(llm.call(long_step))
    try:
        await asyncio.get_running_loop().run_in_executor(None, held.wait, 10)
        assert held.is_set()
        subject = Subjects.worker("busy", "generate")
        # The engine thread cannot take a command until `release`: every answer below comes from the
        # worker's event loop. 2 s is a hang guard far above the milliseconds it takes.
        bad = await client.request(subject, generate("bad", [10**6]), GenerateResult, timeout=2)
        assert isinstance(bad, ErrorReply) and bad.code == "invalid_request" and bad.field == "prompt"
        replies = [
            await client.request(subject, generate(f"q{i}", [5, 6, 7, i + 8]), GenerateResult, timeout=2)
            for i in range(3)
        ]
        assert all(isinstance(r, GenerateAccepted) for r in replies), replies
        full = await client.request(subject, generate("q3", [5, 6, 7]), GenerateResult, timeout=2)
        assert isinstance(full, ErrorReply) and full.code == "overloaded"  # typed, not a timeout
        assert not busy.done()  # all of it answered while the engine was still held
    finally:
        release.set()
        await busy
    # once the engine moves on, the accepted requests run to completion
    for i in range(3):
        deadline = asyncio.get_running_loop().time() + 30
        while f"q{i}" in worker._pumps and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert f"q{i}" not in worker._pumps
    await worker_bus.close()
    await client.close()
    llm.shutdown()
