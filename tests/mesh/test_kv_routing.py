"""KV-aware routing on the real mesh: a conversation's next turn goes where its KV cache is."""

import asyncio
import time

import openai

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import (
    ChatMessage,
    EncodeRequest,
    EncodeResult,
    OverlapRequest,
    OverlapResult,
    Subjects,
)

SYSTEM = "You are a meticulous assistant. " + " ".join(
    f"Rule {i}: answer briefly and politely." for i in range(40)
)


async def wait_indexed(nats_url: str, messages: list[dict]) -> dict[str, int]:
    """Until the kv-index reports some worker holding this conversation's prefix."""
    bus = await Bus.connect(nats_url, "test-kv")
    try:
        msgs = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        enc = await bus.request(
            Subjects.TOKENIZER_ENCODE, EncodeRequest(request_id="t", messages=msgs), EncodeResult
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            reply = await bus.request(
                Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=enc.block_hashes), OverlapResult
            )
            if reply.overlap:
                return reply.overlap
            await asyncio.sleep(0.1)
        return {}
    finally:
        await bus.close()


def test_follow_up_turns_go_to_the_worker_holding_the_conversation(mesh, worker_stats):
    client = openai.OpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a color."}]
    answer = client.chat.completions.create(model=model, messages=turn1, max_tokens=8, temperature=0)
    turn2 = [*turn1, {"role": "assistant", "content": answer.choices[0].message.content or ""}]
    turn2.append({"role": "user", "content": "And another one?"})
    held = asyncio.run(wait_indexed(mesh.nats_url, turn2))
    assert len(held) == 1, f"one worker holds the conversation: {held}"
    (holder,) = held
    (other,) = [w for w in mesh.worker_ids if w != holder]
    before = {w: worker_stats(w) for w in mesh.worker_ids}
    for _ in range(3):
        client.chat.completions.create(model=model, messages=turn2, max_tokens=4, temperature=0)
    after = {w: worker_stats(w) for w in mesh.worker_ids}
    assert after[other].prefix_query_tokens == before[other].prefix_query_tokens, "nothing went elsewhere"
    hits = after[holder].prefix_hit_tokens - before[holder].prefix_hit_tokens
    assert hits >= 3 * 16 * held[holder] - 3 * 16, (
        f"the holder served all three from its cache ({hits} hit tokens)"
    )
