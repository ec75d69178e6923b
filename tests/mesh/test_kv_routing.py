"""KV-aware routing on the real mesh: a conversation's next turn goes where its KV cache is, and the
router says so: each decision's reason is `prefix`, its prefix-hit tokens are all that any worker
held, and its own answers name the holder every time (a router choosing at random would match one
decision in two, so a dozen of them tell it apart)."""

import asyncio
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import (
    ChatMessage,
    EncodeReply,
    EncodeRequest,
    EncodeResult,
    OverlapRequest,
    OverlapResult,
    RouteReply,
    RouteRequest,
    RouteResult,
    Subjects,
)

SYSTEM = "You are a meticulous assistant. " + " ".join(
    f"Rule {i}: answer briefly and politely." for i in range(40)
)
BLOCK = 16
FOLLOW_UPS = 3  # follow-up turns sent through the gateway
PROBES = 8  # routing decisions then asked of the router directly (max_tokens=0: little load added)
DECISIONS = "kvmesh:router_decisions_total"
HIT = "kvmesh:router_prefix_hit_tokens_total"
AVAILABLE = "kvmesh:router_prefix_available_tokens_total"


def router_counters(url: str) -> dict[str, float]:
    """{sample name, or name{reason}: value} of the router's decision counters (each must exist)."""
    text = httpx.get(url, timeout=10).raise_for_status().text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == DECISIONS:
                key = f"{DECISIONS}{{{s.labels['reason']}}}"
                out[key] = out.get(key, 0.0) + s.value
            elif s.name in (HIT, AVAILABLE):
                out[s.name] = out.get(s.name, 0.0) + s.value
    assert HIT in out and AVAILABLE in out, f"router prefix counters missing: {sorted(out)}"
    return out


async def encode(bus: Bus, messages: list[dict]) -> EncodeReply:
    msgs = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    enc = await bus.request(
        Subjects.TOKENIZER_ENCODE, EncodeRequest(request_id="t", messages=msgs), EncodeResult
    )
    assert isinstance(enc, EncodeReply), enc
    return enc


async def wait_indexed(nats_url: str, messages: list[dict]) -> dict[str, int]:
    """Until the kv-index reports some worker holding this conversation's prefix."""
    bus = await Bus.connect(nats_url, "test-kv")
    try:
        enc = await encode(bus, messages)
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


async def ask_router(nats_url: str, messages: list[dict], count: int, until: str | None = None) -> list:
    """`count` routing decisions for this conversation's prompt, asked of the router directly; with
    `until` (a worker id): instead, decisions until one is a prefix hit on it (bounded)."""
    bus = await Bus.connect(nats_url, "test-kv-route")
    try:
        enc = await encode(bus, messages)
        req = RouteRequest(
            request_id="probe", num_tokens=len(enc.token_ids), max_tokens=0, block_hashes=enc.block_hashes
        )
        replies = []
        deadline = time.monotonic() + 15
        while len(replies) < count or until is not None:
            reply = await bus.request(Subjects.ROUTER_ROUTE, req, RouteResult)
            assert isinstance(reply, RouteReply), reply
            replies.append(reply)
            if until is not None:
                if (reply.worker_id, reply.reason) == (until, "prefix"):
                    return replies
                # the router's replica of the index follows the KV event stream: a moment behind
                assert time.monotonic() < deadline, f"the router never routed by prefix to {until}: {reply}"
                await asyncio.sleep(0.1)
        return replies
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
    assert held[holder] >= 10, held  # the system prompt alone is many blocks
    asyncio.run(ask_router(mesh.nats_url, turn2, 0, until=holder))  # the router's replica has it too

    router = mesh.metrics_urls["router"]
    before = {w: worker_stats(w) for w in mesh.worker_ids}
    r0 = router_counters(router)
    for _ in range(FOLLOW_UPS):
        client.chat.completions.create(model=model, messages=turn2, max_tokens=4, temperature=0)
    r1 = router_counters(router)
    after = {w: worker_stats(w) for w in mesh.worker_ids}

    def delta(key: str) -> float:
        return r1.get(key, 0.0) - r0.get(key, 0.0)

    decisions = {k: delta(k) for k in r1 if k.startswith(DECISIONS) and delta(k)}
    assert decisions == {f"{DECISIONS}{{prefix}}": FOLLOW_UPS}, decisions
    # every decision took all the reuse there was, and there was at least the held prefix each time
    assert delta(HIT) == delta(AVAILABLE) >= FOLLOW_UPS * BLOCK * held[holder], (delta(HIT), delta(AVAILABLE))
    assert after[other].prefix_query_tokens == before[other].prefix_query_tokens, "nothing went elsewhere"
    hits = after[holder].prefix_hit_tokens - before[holder].prefix_hit_tokens
    assert hits >= FOLLOW_UPS * BLOCK * held[holder] - FOLLOW_UPS * BLOCK, (
        f"the holder served all three from its cache ({hits} hit tokens)"
    )
    replies = asyncio.run(ask_router(mesh.nats_url, turn2, PROBES))
    assert [(r.worker_id, r.reason) for r in replies] == [(holder, "prefix")] * PROBES, replies
