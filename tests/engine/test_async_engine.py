import asyncio

import pytest

from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(default_model_path):
    return LLMEngine(EngineConfig(model=str(default_model_path)))


async def test_streams_concurrently_and_aborts(engine):
    llm = AsyncLLM(engine)
    prompt = engine.tokenizer.encode(
        "Once upon a time, in a land far away, there lived a curious fox who", add_special_tokens=False
    )

    async def run(i: int, n: int) -> list[int]:
        tokens = []
        async for out in llm.generate(
            f"s{i}", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        ):
            tokens += out.new_token_ids
        return tokens

    results = await asyncio.gather(*(run(i, 5 + i) for i in range(4)))
    assert [len(r) for r in results] == [5, 6, 7, 8]
    assert all(r[:5] == results[0] for r in results), "greedy: same prompt, same prefix"

    with pytest.raises(InvalidRequestError):
        await llm.add_request("bad", [], SamplingParams())

    # closing a stream early aborts the request and returns its blocks
    gen = llm.generate("long", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
    async for _ in gen:
        break
    await gen.aclose()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if llm.stats.num_running == 0 and llm.stats.num_free_blocks == llm.stats.num_blocks:
            break
    assert llm.stats.num_free_blocks == llm.stats.num_blocks
    events = llm.take_kv_events()
    assert events and type(events[0]).__name__ == "BlockStored"
    llm.shutdown()
