"""Contract tests of the gateway's reliability and security: request migration, admission, limits,
API keys. The real gateway (uvicorn, real HTTP) and a real nats-server; tokenizer, router and two
workers are stand-ins speaking the real schemas, scripted to die, hang, forget or fill up.
(tests/reliability runs the same faults with real worker processes and the real model.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
import pytest
import pytest_asyncio
import uvicorn

from kvmesh.libs.bus import Bus
from kvmesh.libs.launcher import free_port
from kvmesh.schemas.messages import (
    AbortRequest,
    EncodeReply,
    EncodeRequest,
    ErrorReply,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    RequestStatusQuery,
    RequestStatusReply,
    RouteReply,
    RouteRequest,
    Subjects,
    TokenChunk,
)
from kvmesh.services.gateway.app import create_app
from kvmesh.services.gateway.config import GatewayConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

ANSWER = "One, two, three, four, five, six, seven, eight, nine, ten."
WORKERS = ("w0", "w1")
FAST = {"liveness_interval": 0.2, "probe_timeout": 0.3, "bus_timeout": 1.0, "token_timeout": 10}


class StandInWorker:
    """Streams ANSWER's tokens one per chunk, continuing a resumed request where it left off.
    `fail`: None (serve), "die" (drop every subscription: a killed process), "forget" (keep answering,
    report the request unknown: a restarted one), "hang" (answer nothing at all), "gap" (skip a chunk),
    "silent" (accept, never stream, say it is running); `fail_after` chunks are sent first."""

    def __init__(self, bus: Bus, worker_id: str, answer_ids: list[int]) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.answer = answer_ids
        self.generates: list[GenerateRequest] = []
        self.aborts: list[str] = []
        self.running: dict[str, asyncio.Task] = {}
        self.tasks: set[asyncio.Task] = set()
        self.reset()

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.fail: str | None = None
        self.fail_after = 0
        self.overloaded = False
        self.refused = 0  # generate requests answered `overloaded`
        self.delay = 0.01
        self.generates.clear()
        self.aborts.clear()

    async def attach(self) -> None:
        w = self.worker_id
        self.subs = [
            await self.bus.serve(Subjects.worker(w, "generate"), GenerateRequest, self.on_generate),
            await self.bus.serve(Subjects.worker(w, "abort"), AbortRequest, self.on_abort),
            await self.bus.serve(Subjects.worker(w, "status"), RequestStatusQuery, self.on_status),
        ]

    async def detach(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()
        self.subs = []

    async def on_generate(self, req: GenerateRequest, _raw) -> GenerateAccepted | ErrorReply | None:
        if self.fail == "vanish":  # dies holding the request, before answering
            await self.detach()
            return None
        if self.overloaded and not req.migrated:  # like the real worker's bounded queue
            self.refused += 1
            return ErrorReply(code="overloaded", message="3 requests already waiting")
        self.generates.append(req)
        task = self.running[req.request_id] = asyncio.create_task(self._stream(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return GenerateAccepted(worker_id=self.worker_id)

    async def on_abort(self, req: AbortRequest, _raw) -> None:
        self.aborts.append(req.request_id)
        task = self.running.pop(req.request_id, None)
        if task is not None:
            task.cancel()

    async def on_status(self, req: RequestStatusQuery, _raw) -> RequestStatusReply | None:
        if self.fail == "hang":
            return None
        return RequestStatusReply(running=req.request_id in self.running and self.fail != "forget")

    async def _stream(self, req: GenerateRequest) -> None:
        s = req.sampling
        todo = self.answer[s.resumed_tokens : s.resumed_tokens + s.max_tokens]
        sent = 0
        try:
            for token in todo:
                await asyncio.sleep(self.delay)
                if self.fail is not None and sent == self.fail_after:
                    if self.fail == "gap":
                        self.fail = None
                        sent += 1
                        continue  # this chunk never arrives
                    if self.fail == "die":
                        await self.detach()
                    elif self.fail == "forget":
                        self.running.pop(req.request_id, None)
                    await asyncio.sleep(3600)  # silent from now on
                await self.bus.publish(req.stream_subject, TokenChunk(token_ids=[token], first_index=sent))
                sent += 1
            reason = "length" if len(todo) == s.max_tokens else "stop"
        except asyncio.CancelledError:
            reason = "abort"
        self.running.pop(req.request_id, None)
        finished = Finished(
            finish_reason=reason,
            num_prompt_tokens=len(req.token_ids),
            num_output_tokens=sent,
            num_cached_tokens=0,
        )
        await self.bus.publish(req.stream_subject, finished)


class StandIns:
    def __init__(self, bus: Bus, tokenizer) -> None:
        self.bus = bus
        self.tok = tokenizer
        answer = tokenizer.encode(ANSWER, add_special_tokens=False).ids
        self.workers = {w: StandInWorker(bus, w, answer) for w in WORKERS}
        self.routes: list[RouteRequest] = []

    def reset(self) -> None:
        self.routes.clear()
        for w in self.workers.values():
            w.reset()

    async def attach(self) -> None:
        await self.bus.serve(Subjects.TOKENIZER_ENCODE, EncodeRequest, self.on_encode, queue="tokenizer")
        await self.bus.serve(Subjects.ROUTER_ROUTE, RouteRequest, self.on_route, queue="router")
        for w in self.workers.values():
            await w.attach()

    async def on_encode(self, req: EncodeRequest, _raw) -> EncodeReply:
        text = req.prompt if req.prompt is not None else " ".join(m.content for m in req.messages or [])
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return EncodeReply(token_ids=ids, block_hashes=[], block_size=16)

    async def on_route(self, req: RouteRequest, _raw) -> RouteReply | ErrorReply:
        """Like the real router: the first worker not excluded (w0 unless it is)."""
        self.routes.append(req)
        for w in WORKERS:
            if w not in req.exclude:
                return RouteReply(worker_id=w, reason="load")
        return ErrorReply(code="no_workers", message="no live worker can take the request")

    async def revive(self) -> None:
        for w in self.workers.values():
            if not w.subs:
                await w.attach()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def standins(gateway_nats_url, tokenizer):
    bus = await Bus.connect(gateway_nats_url, "stand-ins")
    s = StandIns(bus, tokenizer)
    await s.attach()
    yield s
    await bus.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(gateway_nats_url, tokenizer, served_model):
    """gateway(**config) -> an httpx client of a fresh gateway with that config."""
    stack = contextlib.AsyncExitStack()

    async def start(**overrides) -> httpx.AsyncClient:
        bus = await Bus.connect(gateway_nats_url, "gateway")
        stack.push_async_callback(bus.close)
        port = free_port()
        fields = {**FAST, **overrides}
        config = GatewayConfig(nats_url=gateway_nats_url, port=port, model=str(served_model.path), **fields)
        app = create_app(config, bus, tokenizer, served_model)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, access_log=False, log_level="warning", lifespan="off"
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)

        async def stop() -> None:
            server.should_exit = True
            await serving

        stack.push_async_callback(stop)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20)
        stack.push_async_callback(client.aclose)
        return client

    yield start
    await stack.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(gateway):
    return await gateway()


@pytest_asyncio.fixture(loop_scope="module")
async def mesh(standins):
    standins.reset()
    await standins.revive()
    yield standins
    await standins.revive()


async def stream_text(client: httpx.AsyncClient, body: dict) -> tuple[str, list]:
    """The streamed completion's text and its events (errors included)."""
    events = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return text, events


async def eventually(condition, message: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), message


BODY = {"prompt": "Count to ten.", "max_tokens": 100, "stream_options": {"include_usage": True}}


LOSSES = [(f, n) for f in ("die", "forget", "hang") for n in (4, 0)] + [("gap", 4)]


@pytest.mark.parametrize(("fail", "fail_after"), LOSSES, ids=[f"{f}-after-{n}" for f, n in LOSSES])
async def test_a_lost_request_moves_to_another_worker_without_gaps_or_repeats(mesh, client, fail, fail_after):
    """die: no responders; forget: "not running"; hang: no answer to the probe; gap: a lost chunk."""
    w0, w1 = mesh.workers["w0"], mesh.workers["w1"]
    w0.fail, w0.fail_after = fail, fail_after
    text, events = await stream_text(client, BODY)
    assert text == ANSWER, events
    n = len(w0.answer)
    assert events[-1]["usage"]["completion_tokens"] == n
    assert events[-1]["usage"]["prompt_tokens"] == len(w0.generates[0].token_ids)
    # w1 got prompt + what w0 had delivered, and only the budget that was left
    first, cont = w0.generates[0], w1.generates[0]
    done = fail_after
    assert cont.request_id == first.request_id
    assert cont.token_ids == first.token_ids + w0.answer[:done]
    s = cont.sampling
    assert (s.max_tokens, s.resumed_tokens) == (first.sampling.max_tokens - done, done)
    assert mesh.routes[-1].exclude == ["w0"]
    if fail != "die":
        assert first.request_id in w0.aborts, "the lost worker is told to drop it, in case it is alive"


async def test_min_tokens_and_seed_carry_over(mesh, client):
    w0, w1 = mesh.workers["w0"], mesh.workers["w1"]
    w0.fail, w0.fail_after = "die", 3
    body = {**BODY, "min_tokens": 5, "seed": 11, "temperature": 0.7, "max_tokens": 8}
    text, _ = await stream_text(client, body)
    assert text == mesh.tok.decode(w0.answer[:8])
    s = w1.generates[0].sampling
    assert (s.max_tokens, s.min_tokens, s.seed, s.resumed_tokens, s.temperature) == (5, 2, 11, 3, 0.7)


async def test_a_request_lost_too_often_ends_with_a_clear_error(mesh, gateway):
    client = await gateway(max_migrations=1)
    for w in mesh.workers.values():
        w.fail, w.fail_after = "forget", 2
    text, events = await stream_text(client, BODY)
    assert events[-1]["error"]["code"] == "worker_lost", events[-1]
    assert text == mesh.tok.decode(mesh.workers["w0"].answer[:4]), "what arrived was delivered once"


async def test_non_streaming_requests_move_too(mesh, client):
    mesh.workers["w0"].fail, mesh.workers["w0"].fail_after = "die", 5
    r = await client.post("/v1/completions", json={"prompt": "Count to ten.", "max_tokens": 100})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ANSWER


async def test_a_full_worker_is_skipped_and_all_full_waits_in_the_queue(mesh, client, gateway):
    mesh.workers["w0"].overloaded = True
    r = await client.post("/v1/completions", json={"prompt": "Count to ten.", "max_tokens": 3})
    assert r.status_code == 200 and mesh.workers["w1"].generates
    mesh.workers["w1"].overloaded = True
    refusals = {w: w.refused for w in mesh.workers.values()}
    # By default the request waits in the gateway's queue (flow control) instead of failing ...
    waiting = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
    await eventually(
        lambda: all(w.refused >= refusals[w] + 2 for w in mesh.workers.values()),
        "both workers refused it at least twice: it went back to the queue and came out again",
    )
    assert not waiting.done()
    mesh.workers["w1"].overloaded = False  # ... and is served once a worker has room
    r = await waiting
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    # Set up for early 429s (no queue), all full is 429 with Retry-After at once.
    early = await gateway(max_queue=0)
    mesh.workers["w1"].overloaded = True
    for stream in (False, True):
        r = await early.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": stream})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1


async def test_the_first_token_timeout_counts_from_dispatch_not_from_the_queue(mesh, gateway):
    """A request that waited in the queue longer than the first-token timeout still gets its whole
    first-token time once a worker takes it (a burst's last requests used to time out unserved)."""
    client = await gateway(first_token_timeout=0.5)
    for w in mesh.workers.values():
        w.overloaded = True
    waiting = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
    await eventually(
        lambda: all(w.refused >= 4 for w in mesh.workers.values()),  # >= 3 backoffs of 0.2 s: > 0.5 s
        "the request went back to the queue several times",
    )
    for w in mesh.workers.values():
        w.overloaded = False
    r = await waiting
    assert r.status_code == 200, r.text


async def test_gateway_in_flight_bound_is_429_then_frees(mesh, gateway):
    client = await gateway(max_inflight=1)
    mesh.workers["w0"].delay = 0.05
    body = {"prompt": "Count to ten.", "max_tokens": 100, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as first:
        assert first.status_code == 200
        over = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert (await client.get("/health")).status_code == 200, "probes are not admission-controlled"
        await first.aread()
    mesh.workers["w0"].delay = 0.0
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, "the slot came back when the stream ended"


async def test_first_token_timeout_is_a_clear_504(mesh, gateway):
    client = await gateway(first_token_timeout=0.5)
    mesh.workers["w0"].fail = "silent"
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "first_token_timeout" and "0.5 s" in r.json()["error"]["message"]
    await eventually(lambda: mesh.workers["w0"].aborts, "the worker is told to drop it")


async def test_size_limits(mesh, gateway):
    client = await gateway(max_body_bytes=2000, max_prompt_tokens=20, max_tokens_cap=50)
    r = await client.post("/v1/completions", json={"prompt": "x" * 3000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunked():  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 500

    r = await client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = await client.post("/v1/completions", json={"prompt": "word " * 30, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    assert r.json()["error"]["param"] == "prompt"
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 51})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200 and mesh.workers["w0"].generates[-1].sampling.max_tokens == 50
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
    assert r.status_code == 200


async def test_api_keys(mesh, gateway, caplog):
    keys = ("sk-first-0123456789", "sk-second-abcdefghij")
    caplog.set_level(logging.DEBUG)
    client = await gateway(api_keys=keys)
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": keys[0]},
        {"X-Api-Key": keys[0]},
    ):
        r = await client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for key in keys:
        r = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    assert (await client.get("/v1/models")).status_code == 401
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    for key in keys:
        assert key not in caplog.text, "a key reached the logs"
    assert keys[0] not in repr(GatewayConfig(api_keys=keys))


async def test_a_worker_dying_before_it_accepts_is_not_waited_for(mesh, gateway, caplog):
    client = await gateway(bus_timeout=30)  # the generate request alone would wait this long
    mesh.workers["w0"].fail = "vanish"
    text, _ = await stream_text(client, BODY)
    assert text == ANSWER
    assert "died before accepting" in caplog.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "seed": 2**70}, "seed"),
        ({"prompt": "hi", "top_k": 2**70}, "top_k"),
        ({"prompt": "hi", "stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"prompt": "hi", "min_tokens": 2**70}, "min_tokens"),
        ({"prompt": [5, 2**70]}, "prompt"),
        ({"prompt": [[2**40]]}, "prompt"),
    ],
)
async def test_integers_beyond_the_wire_are_400_not_500(mesh, client, body, param):
    """msgpack carries 64-bit integers at most: found by fuzzing the live mesh (seed=2**70 was a 500)."""
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = await client.post("/detokenize", json={"tokens": [2**70]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


async def test_a_lost_request_moves_even_to_a_full_worker(mesh, client):
    """It was admitted already: a full survivor takes it rather than lose it (found by the soak)."""
    mesh.workers["w0"].fail, mesh.workers["w0"].fail_after = "die", 3
    mesh.workers["w1"].overloaded = True
    text, _ = await stream_text(client, BODY)
    assert text == ANSWER and mesh.workers["w1"].generates[0].migrated
