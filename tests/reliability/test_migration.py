"""Request migration with real worker processes SIGKILLed: mid-stream and before the first token.
The client's stream goes on from the other worker; with greedy decoding its text equals a run without
the failure. A spy on NATS sees which worker got the request, counts its chunks, times the kill and
checks what the continuation carried (prompt + tokens so far, the budget left)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import wait_for_worker

from kvmesh.libs.bus import Bus, decode
from kvmesh.schemas.messages import (
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    StreamMessage,
    TokenChunk,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TOKENS = 24


class Spy:
    """Copies of every generate request and every stream chunk (plain subscriptions see everything)."""

    def __init__(self) -> None:
        self.generates: list[tuple[float, str, GenerateRequest]] = []  # (time, worker id, request)
        self.chunks: dict[str, int] = {}  # stream subject -> chunks seen
        self.accepted: list[str] = []  # worker ids, from the replies to generate
        self.new_generate = asyncio.Event()
        self.new_chunk = asyncio.Event()
        self.new_accept = asyncio.Event()

    async def start(self, nats_url: str) -> Bus:
        bus = await Bus.connect(nats_url, "spy")

        async def on_generate(raw) -> None:
            worker_id = raw.subject.split(".")[2]
            self.generates.append((time.monotonic(), worker_id, decode(raw.data, GenerateRequest)))
            self.new_generate.set()

        async def on_stream(raw) -> None:
            if type(decode(raw.data, StreamMessage)) is TokenChunk:
                self.chunks[raw.subject] = self.chunks.get(raw.subject, 0) + 1
                self.new_chunk.set()

        async def on_reply(raw) -> None:
            try:
                reply = decode(raw.data, GenerateResult)
            except Exception:  # a reply to something else
                return
            if type(reply) is GenerateAccepted:
                self.accepted.append(reply.worker_id)
                self.new_accept.set()

        await bus.nc.subscribe("kvmesh.worker.*.generate", cb=on_generate)
        await bus.nc.subscribe("_INBOX.>", cb=on_reply)
        await bus.nc.subscribe("kvmesh.stream.>", cb=on_stream)
        await bus.nc.flush()
        return bus

    def of(self, request_id: str) -> list[tuple[float, str, GenerateRequest]]:
        return [g for g in self.generates if g[2].request_id == request_id]


async def stream_completion(base_url: str, body: dict) -> tuple[str, dict | None, list]:
    text, usage, errors = [], None, []
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
            elif event.get("choices"):
                text.append(event["choices"][0]["text"])
            elif event.get("usage"):
                usage = event["usage"]
    return "".join(text), usage, errors


async def complete(base_url: str, body: dict) -> str:
    body = {k: v for k, v in body.items() if k != "stream_options"}
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def body_for(prompt: str) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


async def wait_for(event: asyncio.Event, condition) -> None:
    while not condition():
        await asyncio.wait_for(event.wait(), 60)
        event.clear()


async def run_with_a_kill(mesh, kill_when: str, prompt: str) -> dict:
    """Stream `prompt`; SIGKILL its worker when it has the request (`received`), has accepted it
    (`accepted`) or has sent 8 chunks (`streaming`); return what the client and the spy saw."""
    spy = Spy()
    spy_bus = await spy.start(mesh.nats_url)
    try:
        client = asyncio.create_task(stream_completion(mesh.base_url, body_for(prompt)))
        await wait_for(spy.new_generate, lambda: spy.generates)
        _, victim, first = spy.generates[0]
        if kill_when == "accepted":
            await wait_for(spy.new_accept, lambda: victim in spy.accepted)
        elif kill_when == "streaming":
            await wait_for(spy.new_chunk, lambda: spy.chunks.get(first.stream_subject, 0) >= 8)
        mesh.kill(victim)
        killed_at = time.monotonic()
        chunks_before_kill = spy.chunks.get(first.stream_subject, 0)
        text, usage, errors = await asyncio.wait_for(client, 120)
        moves = spy.of(first.request_id)[1:]
    finally:
        await spy_bus.close()
    return {
        "victim": victim,
        "first": first,
        "moves": moves,
        "chunks_before_kill": chunks_before_kill,
        "detected_s": moves[0][0] - killed_at if moves else None,
        "text": text,
        "usage": usage,
        "errors": errors,
    }


LONG_PROMPT = "Summarize this list. " + " ".join(f"item {i} is {i * 7 % 13};" for i in range(80))


@pytest.mark.parametrize(
    ("kill_when", "prompt"),
    [
        ("streaming", "The history of the printing press begins"),
        ("accepted", LONG_PROMPT + " Go."),  # its prefill takes a while: no token yet at the kill
        ("received", LONG_PROMPT + " Now."),  # killed before it could even answer `generate`
    ],
    ids=["streaming", "accepted", "received"],
)
async def test_sigkill_moves_the_stream_to_another_worker_and_the_text_is_unchanged(mesh, kill_when, prompt):
    await asyncio.gather(*(wait_for_worker(mesh, w) for w in mesh.worker_ids))
    seen = await run_with_a_kill(mesh, kill_when, prompt)
    victim, first, moves = seen["victim"], seen["first"], seen["moves"]
    mesh.restart(victim)  # it loads while the rest of the test runs on the other worker
    assert not seen["errors"], seen["errors"]
    if kill_when == "streaming":
        assert 0 < seen["chunks_before_kill"] < MAX_TOKENS
    else:
        assert seen["chunks_before_kill"] == 0, "the kill came too late for what this case tests"
    assert len(moves) == 1, moves
    _, new_worker, cont = moves[0]
    assert new_worker != victim
    done = len(cont.token_ids) - len(first.token_ids)
    assert cont.token_ids[: len(first.token_ids)] == first.token_ids
    assert done >= seen["chunks_before_kill"]
    assert (cont.sampling.max_tokens, cont.sampling.resumed_tokens) == (MAX_TOKENS - done, done)
    assert seen["usage"]["completion_tokens"] == MAX_TOKENS
    assert seen["usage"]["prompt_tokens"] == len(first.token_ids)
    n, took = seen["chunks_before_kill"], seen["detected_s"]
    print(f"\n{victim} killed ({kill_when}, {n} chunks out): moved in {took:.2f} s")
    # the same request with no failure (greedy, float32): the same text, token for token
    assert seen["text"] == await complete(mesh.base_url, body_for(prompt))
