"""Contract test: the real gateway (uvicorn, real HTTP) against a real nats-server, with the tokenizer,
router and worker played by small responders that speak the real schemas (schemas/messages.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import pytest_asyncio
import uvicorn

from kvmesh.libs.bus import Bus
from kvmesh.libs.launcher import free_port
from kvmesh.schemas.messages import (
    AbortRequest,
    DetokenizeReply,
    DetokenizeRequest,
    EncodeReply,
    EncodeRequest,
    ErrorReply,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    RouteReply,
    RouteRequest,
    Subjects,
    TokenChunk,
)
from kvmesh.services.gateway.app import create_app
from kvmesh.services.gateway.config import GatewayConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

WORKER = "w1"
CACHED = 3  # what the stand-in worker reports as prefix-cache hits


class StandInMesh:
    """Tokenizer, router and one worker, scripted per test."""

    def __init__(self, bus: Bus, tokenizer) -> None:
        self.bus = bus
        self.tok = tokenizer
        self.encodes: list[EncodeRequest] = []
        self.routes: list[RouteRequest] = []
        self.generates: list[GenerateRequest] = []
        self.aborts: list[str] = []
        self.aborted = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.route_to: list[str] = []  # worker ids to answer, in order (then WORKER)
        self.route_error: str | None = None
        self.chunks: list[list[int]] = []
        self.delays: list[float] = []  # before each chunk (0 if missing)
        self.endless = False  # stream token 42 every 10 ms until aborted
        self.aborted.clear()
        self._streams: dict[str, asyncio.Task] = {}

    def script(self, text: str, sizes: list[int], delays: list[float] | None = None) -> None:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        self.chunks, i = [], 0
        for n in [*sizes, len(ids)]:
            if i < len(ids):
                self.chunks.append(ids[i : i + n])
            i += n
        self.delays = delays or []

    async def attach(self) -> None:
        await self.bus.serve(Subjects.TOKENIZER_ENCODE, EncodeRequest, self.on_encode, queue="tokenizer")
        await self.bus.serve(Subjects.TOKENIZER_DETOKENIZE, DetokenizeRequest, self.on_detokenize)
        await self.bus.serve(Subjects.ROUTER_ROUTE, RouteRequest, self.on_route, queue="router")
        await self.bus.serve(Subjects.worker(WORKER, "generate"), GenerateRequest, self.on_generate)
        await self.bus.serve(Subjects.worker(WORKER, "abort"), AbortRequest, self.on_abort)

    async def on_encode(self, req: EncodeRequest, _raw) -> EncodeReply:
        self.encodes.append(req)
        if req.messages is not None:
            text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in req.messages)
            ids = self.tok.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids
        elif req.prompt is not None:
            ids = self.tok.encode(req.prompt, add_special_tokens=False).ids
        else:
            ids = list(req.token_ids or [])
        return EncodeReply(token_ids=ids, block_hashes=[7] * (len(ids) // 16), block_size=16)

    async def on_detokenize(self, req: DetokenizeRequest, _raw) -> DetokenizeReply:
        return DetokenizeReply(text=self.tok.decode(req.token_ids, skip_special_tokens=False))

    async def on_route(self, req: RouteRequest, _raw) -> RouteReply | ErrorReply:
        self.routes.append(req)
        if self.route_error:
            return ErrorReply(code=self.route_error, message="no live worker can take the request")
        worker = self.route_to.pop(0) if self.route_to else WORKER
        return RouteReply(worker_id=worker, reason="only")

    async def on_generate(self, req: GenerateRequest, _raw) -> GenerateAccepted:
        self.generates.append(req)
        self._streams[req.request_id] = asyncio.create_task(self._stream(req))
        return GenerateAccepted(worker_id=WORKER)

    async def on_abort(self, req: AbortRequest, _raw) -> None:
        self.aborts.append(req.request_id)
        self.aborted.set()
        task = self._streams.pop(req.request_id, None)
        if task is not None:
            task.cancel()

    async def _stream(self, req: GenerateRequest) -> None:
        sent = 0
        reason = "stop"
        try:
            if self.endless:
                while True:
                    await asyncio.sleep(0.01)
                    await self.bus.publish(req.stream_subject, TokenChunk(token_ids=[42], first_index=sent))
                    sent += 1
            for i, chunk in enumerate(self.chunks):
                await asyncio.sleep(self.delays[i] if i < len(self.delays) else 0)
                await self.bus.publish(req.stream_subject, TokenChunk(token_ids=chunk, first_index=sent))
                sent += len(chunk)
        except asyncio.CancelledError:
            reason = "abort"
        await self.bus.publish(
            req.stream_subject,
            Finished(
                finish_reason=reason,
                num_prompt_tokens=len(req.token_ids),
                num_output_tokens=sent,
                num_cached_tokens=CACHED,
            ),
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(gateway_nats_url, tokenizer, served_model):
    mesh_bus = await Bus.connect(gateway_nats_url, "stand-in-mesh")
    mesh = StandInMesh(mesh_bus, tokenizer)
    await mesh.attach()
    gateway_bus = await Bus.connect(gateway_nats_url, "gateway")
    port = free_port()
    config = GatewayConfig(
        nats_url=gateway_nats_url, port=port, model=str(served_model.path), bus_timeout=1.0, token_timeout=10
    )
    app = create_app(config, gateway_bus, tokenizer, served_model)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, access_log=False, log_level="warning", lifespan="off"
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield mesh, client
    server.should_exit = True
    await serving
    await gateway_bus.close()
    await mesh_bus.close()


@pytest.fixture
def mesh(stack) -> StandInMesh:
    stack[0].reset()
    return stack[0]


@pytest.fixture
def client(stack) -> httpx.AsyncClient:
    return stack[1]


USER = [{"role": "user", "content": "What is the capital of France?"}]


async def test_chat_completion(mesh, client):
    text = "The capital of France is Paris."
    mesh.script(text, [2, 3])
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "SmolLM2-135M-Instruct",
            "messages": USER,
            "max_tokens": 50,
            "temperature": 0,
            "user": "u7",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rid = body["id"]
    assert rid.startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    gen = mesh.generates[-1]
    n_out = len(mesh.tok.encode(text, add_special_tokens=False).ids)
    assert body["usage"] == {
        "prompt_tokens": len(gen.token_ids),
        "completion_tokens": n_out,
        "total_tokens": len(gen.token_ids) + n_out,
        "prompt_tokens_details": {"cached_tokens": CACHED},
    }
    # one request id end to end, and the request's parameters on the wire
    assert mesh.encodes[-1].request_id == mesh.routes[-1].request_id == gen.request_id == rid
    assert mesh.encodes[-1].messages[0].content == USER[0]["content"]
    assert (mesh.routes[-1].session_id, mesh.routes[-1].max_tokens, mesh.routes[-1].num_tokens) == (
        "u7",
        50,
        len(gen.token_ids),
    )
    assert gen.stream_subject == Subjects.stream(rid)
    assert (gen.sampling.max_tokens, gen.sampling.temperature) == (50, 0.0)
    assert not mesh.aborts


async def sse_events(response: httpx.Response) -> list:
    events = []
    async for line in response.aiter_lines():
        if line:
            assert line.startswith("data: ")
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_streaming_chat_with_usage(mesh, client):
    text = "Crabs 🦀 are red."
    mesh.script(text, [1, 1, 1, 1, 1])  # the emoji's three byte tokens arrive one chunk each
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert all(deltas), "no empty deltas"
    assert "".join(deltas) == text
    assert all(c["usage"] is None for c in chunks[:-1])
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == sum(
        map(len, mesh.chunks)
    )
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}


async def test_top_p_2_is_a_400_in_openai_shape(mesh, client):
    seen = len(mesh.encodes)
    r = await client.post("/v1/chat/completions", json={"messages": USER, "top_p": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "top_p" and err["type"] == "invalid_request_error" and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert len(mesh.encodes) == seen, "rejected before reaching the mesh"


async def test_unknown_model_is_404(mesh, client):
    r = await client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_no_workers_is_503(mesh, client):
    mesh.route_error = "no_workers"
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json={"messages": USER, "stream": stream})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_workers"


async def test_prompt_too_long_is_400(mesh, client):
    r = await client.post("/v1/completions", json={"prompt": list(range(8000)), "max_tokens": 500})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"


async def test_stop_string_across_chunks_cuts_and_aborts_the_worker(mesh, client):
    text = "Hello world, STOP here and more text that must never arrive."
    mesh.script(text, [4, 1, 2, 1, 1], delays=[0, 0.05, 0.05, 2, 2])
    r = await client.post(
        "/v1/completions", json={"prompt": "Say hello", "stop": ["STOP here"], "max_tokens": 30}
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("Hello world, ", "stop")
    assert r.json()["id"].startswith("cmpl-")
    assert r.json()["usage"]["completion_tokens"] == 6  # Hello, world, ",", " ST", "OP", " here"
    await asyncio.wait_for(mesh.aborted.wait(), 5)
    assert mesh.aborts[-1] == r.json()["id"]


async def test_client_disconnect_mid_stream_aborts_the_worker(mesh, client):
    mesh.endless = True
    body = {"prompt": "Tell me a long story", "stream": True, "max_tokens": 5000}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    await asyncio.wait_for(mesh.aborted.wait(), 5)
    assert mesh.aborts[-1] == mesh.generates[-1].request_id


async def test_non_streaming_disconnect_aborts_the_worker(mesh, client):
    mesh.endless = True
    with contextlib.suppress(httpx.TimeoutException):
        await client.post("/v1/completions", json={"prompt": "Tell me a long story"}, timeout=0.3)
    await asyncio.wait_for(mesh.aborted.wait(), 5)
    assert mesh.aborts[-1] == mesh.generates[-1].request_id


async def test_vanished_workers_are_routed_around_up_to_three_times(mesh, client):
    mesh.route_to = ["w-gone"]
    mesh.script("fine", [])
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "fine"
    assert mesh.routes[-1].exclude == ["w-gone"]
    assert mesh.generates[-1].stream_subject == Subjects.stream(r.json()["id"]) + ".1", "a stream of its own"
    mesh.route_to = ["w-gone", "w-gone-too", "w-gone-three"]
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert mesh.routes[-1].exclude == ["w-gone", "w-gone-too"]


async def test_models_tokenize_detokenize_health(mesh, client, served_model):
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/v1/models")).json()["data"][0]["id"] == served_model.name
    r = await client.post("/tokenize", json={"prompt": "Hello world"})
    ids = mesh.tok.encode("Hello world", add_special_tokens=False).ids
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": served_model.max_model_len}
    r = await client.post("/tokenize", json={"messages": USER})
    assert r.json()["count"] > len(mesh.tok.encode(USER[0]["content"]).ids)
    assert (await client.post("/detokenize", json={"tokens": ids})).json() == {"prompt": "Hello world"}
