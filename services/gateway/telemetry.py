"""The gateway's metrics and traces: vLLM's client-side latency histograms, /metrics, and the top of
every request's trace.

A trace starts at FastAPI's own HTTP server span (`POST /v1/chat/completions`; it continues a
client's trace when the request carries a traceparent header; /health and /metrics make none).
Under it, `RequestTelemetry` follows one completion request: its `kvmesh.gateway.request` span is the
parent of the tokenizer, router and worker spans (through the NATS headers of the requests sent
while it is current), and it times the token stream as the gateway receives it: time to first token,
one inter-token latency per chunk (a chunk is one engine step), time per output token and
end-to-end latency when the final record arrives. The span ends with the request, however it ends:
finished, failed, or the client gone. No span is made per chunk.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvmesh.libs import tracing
from kvmesh.libs.metrics import GatewayMetrics
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.generation import Generator
from kvmesh.services.gateway.params import GenerationOutput, GenerationParams, PromptInput, Usage

REQUEST_SPAN = "kvmesh.gateway.request"
UNCOUNTED_PATHS = frozenset({"/metrics", "/health", "/ready"})  # scrapes and probes are not traffic
# Refusals before any worker is asked, by the status they leave with (auth, body limit, admission).
REJECTIONS = {401: "unauthorized", 413: "too_large", 429: "overloaded"}


def fastapi_telemetry() -> dict[str, Any]:
    """FastAPI(**fastapi_telemetry()): its native OpenTelemetry (FastAPI >= 0.165) without the
    per-operation spans, and no traces for probes and scrapes. Nothing on older FastAPI."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {
        "telemetry": {"operation_spans": False, "exclude": lambda scope: scope["path"] in UNCOUNTED_PATHS}
    }


class GatewayTelemetry:
    """One per gateway app."""

    def __init__(self, model_name: str) -> None:
        self.metrics = GatewayMetrics(model_name)
        self.model_name = model_name

    def request(self, request_id: str, endpoint: str, stream: bool) -> RequestTelemetry:
        return RequestTelemetry(self, request_id, endpoint, stream)

    def install(self, app: FastAPI) -> None:
        """GET /metrics on the app, kvmesh:gateway_requests_total{status} for every answer and
        kvmesh:gateway_rejected_total{reason} for refusals (REJECTIONS). Install it after the
        middlewares that refuse requests, so that it wraps them."""

        @app.get("/metrics", include_in_schema=False)
        async def metrics(request: Request) -> Response:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(REGISTRY), media_type=content_type)

        app.add_middleware(StatusCounter, telemetry=self)


class StatusCounter:
    """Counts HTTP answers by status code, and refusals by reason with the time each took from its
    arrival at the app (pure ASGI: nothing added to the streamed chunks). A refusal also says that
    time in a `Server-Timing: decision;dur=<ms>` header, so a client can tell the gateway's decision
    from the time its request spent in transit and in the server's accept backlog."""

    def __init__(self, app: ASGIApp, telemetry: GatewayTelemetry) -> None:
        self.app = app
        self.metrics = telemetry.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return

        arrived = time.perf_counter()

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.status(status)
                if status in REJECTIONS:
                    took = time.perf_counter() - arrived
                    self.metrics.rejected(REJECTIONS[status], took)
                    timing = (b"server-timing", f"decision;dur={took * 1000:.3f}".encode())
                    message = {**message, "headers": [*message.get("headers", ()), timing]}
            await send(message)

        await self.app(scope, receive, counting_send)


class RequestTelemetry:
    def __init__(self, owner: GatewayTelemetry, request_id: str, endpoint: str, stream: bool) -> None:
        self._metrics = owner.metrics
        self.arrival = time.perf_counter()
        self.span: Span = tracing.tracer.start_span(
            REQUEST_SPAN,
            kind=SpanKind.INTERNAL,  # under FastAPI's SERVER span
            attributes={
                tracing.REQUEST_ID: request_id,
                tracing.MODEL: owner.model_name,
                "http.route": endpoint,
                "kvmesh.stream": stream,
            },
        )
        self._first: float | None = None
        self._last = 0.0
        self._ended = False

    @contextlib.contextmanager
    def active(self) -> Iterator[Span]:
        """Make the request's span current: the NATS requests sent meanwhile become its children."""
        with trace.use_span(
            self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield self.span

    async def start(
        self, generator: Generator, request_id: str, prompt: PromptInput, params: GenerationParams
    ):
        """generator.start() under the request's span, with the stream's chunks timed."""
        with self.active():
            running = await generator.start(request_id, prompt, params)
        running.on_tokens = self.tokens
        self.span.set_attribute(tracing.WORKER_ID, running.worker_id)
        return running

    def closing(self, close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """`close`, then end the request's telemetry (a streamed response's on_close)."""

        async def closed() -> None:
            try:
                await close()
            finally:
                self.end()

        return closed

    def tokens(self, n: int) -> None:
        """A chunk of `n` tokens arrived from the worker (the per-token path: two clock reads)."""
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._metrics.ttft.observe(now - self.arrival)
        else:
            self._metrics.itl.observe(now - self._last)
        self._last = now

    async def observe(self, outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[GenerationOutput]:
        """Pass a request's outputs through, finishing (or failing) the telemetry at their end."""
        try:
            async for out in outputs:
                if out.finish_reason is not None and out.usage is not None:
                    self.finish(out.finish_reason, out.usage)
                yield out
        except Exception as exc:  # not GeneratorExit / cancellation: the client leaving is end()'s
            self.fail(exc)
            raise

    def finish(self, reason: str, usage: Usage) -> None:
        if self._ended:
            return
        now = time.perf_counter()
        m = self._metrics
        e2e = now - self.arrival
        m.e2e.observe(e2e)
        m.prompt_tokens.observe(usage.prompt_tokens)
        m.generation_tokens.observe(usage.completion_tokens)
        if self._first is not None and usage.completion_tokens > 1:
            m.tpot.observe((now - self._first) / (usage.completion_tokens - 1))
        m.success(reason)
        self.span.set_attributes(
            {
                tracing.PROMPT_TOKENS: usage.prompt_tokens,
                tracing.OUTPUT_TOKENS: usage.completion_tokens,
                tracing.CACHED_TOKENS: usage.cached_tokens,
                tracing.FINISH_REASON: [reason],
                "kvmesh.e2e_s": e2e,
            }
        )
        if self._first is not None:
            self.span.set_attribute("kvmesh.ttft_s", self._first - self.arrival)
        self._end()

    def fail(self, error: BaseException | str) -> None:
        if self._ended:
            return
        if isinstance(error, GatewayError):
            code = error.code or error.type
            self.span.set_attributes({"http.response.status_code": error.status, tracing.ERROR_CODE: code})
            error = error.message
        self._end(error)

    def end(self) -> None:
        """The response is over. Not finished nor failed by then: the client went away."""
        if not self._ended:
            self._metrics.success("abort")
            self.span.set_attribute(tracing.FINISH_REASON, ["abort"])
            self.span.set_attribute("kvmesh.client_disconnected", True)
            self._end()

    def _end(self, error: BaseException | str | None = None) -> None:
        self._ended = True
        if self._first is None and error is None:
            self.span.add_event("no token received")
        tracing.end_span(self.span, error)
