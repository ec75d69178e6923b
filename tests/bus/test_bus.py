"""The bus against a real nats-server."""

import asyncio
import contextlib

import pytest

from kvmesh.libs.bus import Bus, NoResponders, decode
from kvmesh.schemas.messages import (
    DetokenizeReply,
    DetokenizeRequest,
    DetokenizeResult,
    ErrorReply,
    StreamMessage,
    TokenChunk,
)


async def test_request_reply_queue_groups_and_strict_decoding(nats_url):
    a, b, client = [await Bus.connect(nats_url, n) for n in ("a", "b", "client")]
    served = {"a": 0, "b": 0}

    def handler(name):
        async def h(req: DetokenizeRequest, _raw):
            served[name] += 1
            if req.token_ids == [666]:
                raise RuntimeError("boom")
            return DetokenizeReply(text=f"{name}:{len(req.token_ids)}")

        return h

    await a.serve("t.detok", DetokenizeRequest, handler("a"), queue="q")
    await b.serve("t.detok", DetokenizeRequest, handler("b"), queue="q")
    replies = [
        await client.request("t.detok", DetokenizeRequest(token_ids=[1] * i), DetokenizeResult)
        for i in range(40)
    ]
    assert all(isinstance(r, DetokenizeReply) for r in replies)
    assert served["a"] + served["b"] == 40 and served["a"] and served["b"], "a queue group splits the work"

    # garbage and a foreign message type: an ErrorReply, and the service keeps serving
    raw = await client.nc.request("t.detok", b"\xc1not msgpack", timeout=2)
    assert decode(raw.data, DetokenizeResult).code == "invalid_request"
    raw = await client.nc.request("t.detok", b"\x81\xa4type\xaaTokenChunk", timeout=2)
    assert isinstance(decode(raw.data, DetokenizeResult), ErrorReply)
    # a handler that raises answers internal, and the service survives
    err = await client.request("t.detok", DetokenizeRequest(token_ids=[666]), DetokenizeResult)
    assert isinstance(err, ErrorReply) and err.code == "internal" and "boom" in err.message
    ok = await client.request("t.detok", DetokenizeRequest(token_ids=[1, 2]), DetokenizeResult)
    assert isinstance(ok, DetokenizeReply)

    with pytest.raises(NoResponders):
        await client.request("t.nobody", DetokenizeRequest(token_ids=[]), DetokenizeResult, timeout=1)
    for bus in (a, b, client):
        await bus.close()


async def test_listen_keeps_order_and_skips_malformed(nats_url):
    pub, sub = await Bus.connect(nats_url, "pub"), await Bus.connect(nats_url, "sub")
    received: list = []
    listening = asyncio.Event()  # a probe came through: the subscription is live
    probe = [-1]

    async def consume():
        async for msg in sub.listen("t.stream", StreamMessage):
            if msg.token_ids == probe:
                listening.set()
                continue
            received.append(msg)
            if len(received) == 100:
                return

    task = asyncio.create_task(consume())
    # Probes until one arrives; one connection's messages stay in order, so every probe still on its way
    # arrives before the numbered chunks.
    for _ in range(200):  # a hang guard: 10 s
        await pub.publish("t.stream", TokenChunk(token_ids=probe))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listening.wait(), 0.05)
            break
    assert listening.is_set(), "the listener never received a message"
    for i in range(100):
        await pub.publish("t.stream", TokenChunk(token_ids=[i]))
        if i == 50:
            await pub.nc.publish("t.stream", b"junk")
    await asyncio.wait_for(task, 10)
    assert [m.token_ids[0] for m in received] == list(range(100))
    await pub.close()
    await sub.close()
