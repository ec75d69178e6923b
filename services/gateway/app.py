"""The HTTP surface: routes, OpenAI-shaped errors, SSE responses and cancellation on disconnect.

Handlers stay thin: validate (openai_protocol), run (generation), shape (responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from tokenizers import Tokenizer

import kvmesh
from kvmesh.libs.bus import Bus
from kvmesh.services.gateway.admission import InflightLimit
from kvmesh.services.gateway.config import GatewayConfig, ServedModel
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.flow import FlowConfig, FlowController
from kvmesh.services.gateway.flow_gate import FlowGate
from kvmesh.services.gateway.flow_metrics import FLOWS
from kvmesh.services.gateway.generation import Generator
from kvmesh.services.gateway.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from kvmesh.services.gateway.openapi import (
    GENERATION_ERRORS,
    TOKENIZER_ERRORS,
    ChatCompletion,
    Completion,
    DetokenizeResponse,
    HealthResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
    errors,
    install_openapi,
)
from kvmesh.services.gateway.params import GenerationParams, Limits, PromptInput, Timeouts
from kvmesh.services.gateway.readiness import Readiness
from kvmesh.services.gateway.reasoning import ReasoningChatShaper, get_reasoning_parser
from kvmesh.services.gateway.request_fields import refuse_unhonoured
from kvmesh.services.gateway.responses import ChatShaper, CompletionShaper, TokenTexts, sse_stream
from kvmesh.services.gateway.responses_api import ResponsesRequest, ShaperFactory, add_responses_route
from kvmesh.services.gateway.security import ApiKeyAuth, BodyLimit
from kvmesh.services.gateway.telemetry import GatewayTelemetry, fastapi_telemetry
from kvmesh.services.gateway.tool_parsers import get_parser
from kvmesh.services.gateway.tools import ToolChatShaper

log = logging.getLogger(__name__)
T = TypeVar("T")
GenerationBody = ChatCompletionRequest | CompletionRequest | ResponsesRequest

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody receives it


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that always runs `on_close` when it ends, however it ends
    (completed, client disconnected, server shutting down): that is where the worker gets aborted."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self.after_close: list[Callable[[], None]] = []  # run last, whatever happened (admission slot)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await asyncio.shield(self._on_close())
            finally:
                for fn in self.after_close:
                    fn()


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work`; cancel it and return None if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def create_app(
    config: GatewayConfig, bus: Bus, tokenizer: Tokenizer, model: ServedModel | None = None
) -> FastAPI:
    """The gateway's ASGI app. `model` defaults to the card of `config.model` (resolved on disk)."""
    if model is None:
        from kvmesh.libs.engine.model_store import resolve_model

        model = ServedModel.load(config, resolve_model(config.model))
    served = model
    timeouts = Timeouts(
        bus=config.bus_timeout,
        token=config.token_timeout,
        request=config.request_timeout,
        first_token=config.first_token_timeout,
        liveness=config.liveness_interval,
        probe=config.probe_timeout,
        tokenizer_try=config.tokenizer_try_timeout,
        router_try=config.router_try_timeout,
        control_tries=config.control_tries,
    )
    limits = Limits(config.max_prompt_tokens, config.max_tokens_cap, config.max_migrations)
    flow_config = FlowConfig(
        max_queue=config.max_queue,
        queue_ttl_s=config.queue_ttl,
        worker_headroom=config.worker_headroom,
        tenant_rank=bool(config.tenant_rank),
    )
    flow = FlowController(flow_config)
    FLOWS.add(flow, served.name)  # its queue depth and outcomes on /metrics
    generator = Generator(bus, tokenizer, served.max_model_len, timeouts, limits, flow, served.name)
    admission = InflightLimit(config.max_inflight)
    texts = TokenTexts(tokenizer)
    reasoning = get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser else None
    app = FastAPI(
        title="kvmesh gateway",
        summary="OpenAI-compatible API of the kvmesh serving mesh",
        **fastapi_telemetry(),  # FastAPI's own HTTP server span: the trace's root
    )
    _install_error_handlers(app)
    install_openapi(app)  # response models, streams as text/event-stream, 400 instead of 422
    app.state.admission = admission
    app.state.flow = flow
    app.state.generator = generator
    app.state.readiness = readiness = Readiness(bus, flow, generator.watch_workers)
    # Pure ASGI, the last added runs first: authentication, then the body-size limit.
    app.add_middleware(FlowGate, flow=flow, paths=GENERATION_PATHS)  # a full queue: 429 before the body
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_keys=config.api_keys)
    telemetry = GatewayTelemetry(served.name)
    telemetry.install(app)  # GET /metrics, requests counted by status

    def check_model(name: str | None) -> None:
        if not served.accepts(name):
            raise GatewayError.model_not_found(name or "")

    async def complete(
        request: Request, body: GenerationBody, make_shaper: ShaperFactory, id_prefix: str
    ) -> Response:
        """Within the gateway's in-flight bound (429 beyond it), held until the response has ended."""
        admission.acquire()
        try:
            response = await run_completion(request, body, make_shaper, id_prefix)
        except BaseException:
            admission.release()
            raise
        if isinstance(response, SSEResponse):
            response.after_close.append(admission.release)
        else:
            admission.release()
        return response

    async def run_completion(
        request: Request, body: GenerationBody, make_shaper: ShaperFactory, id_prefix: str
    ) -> Response:
        check_model(body.model)
        prompt, params = flow_keys(body.prompt_and_params(), body, request)
        shaper = make_shaper(
            f"{id_prefix}{uuid.uuid4().hex}",  # also the request id on NATS, end to end
            body.model or served.name,
            int(time.time()),
            texts if params.logprobs is not None else None,
            body.include_usage,
        )
        if isinstance(body, CompletionRequest) and isinstance(shaper, CompletionShaper):
            shaper.echo = body.echo_text(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
        if params.tools is not None and isinstance(shaper, ChatShaper):  # calls read from the text: tools.py
            shaper = ToolChatShaper(shaper, params.tools, get_parser(config.tool_call_parser))
        if reasoning is not None and isinstance(shaper, ChatShaper) and params.guided is None:
            # a grammar-constrained answer has no think section: split only free text (reasoning.py)
            shaper = ReasoningChatShaper(shaper, reasoning)
        observed = telemetry.request(shaper.request_id, request.url.path, body.stream)  # the trace's root
        try:
            if body.stream:
                # Started before the response: failures up to the worker's acceptance keep their status.
                # A client that leaves meanwhile (waiting in the queue, say) never reaches a worker.
                started = observed.start(generator, shaper.request_id, prompt, params)
                running = await _unless_disconnected(request, started)
                if running is None:
                    observed.end()
                    log.info("%s: client disconnected before the stream started", shaper.request_id)
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                outputs = observed.observe(running.outputs())
                return SSEResponse(sse_stream(shaper, outputs), on_close=observed.closing(running.close))

            async def whole() -> dict[str, Any]:
                running = await observed.start(generator, shaper.request_id, prompt, params)
                try:
                    text, logprobs, reason, usage = await running.collect()
                    observed.finish(reason, usage)
                    return shaper.response(text, logprobs, reason, usage)
                finally:
                    await running.close()

            result = await _unless_disconnected(request, whole())
        except Exception as exc:
            observed.fail(exc)
            raise
        observed.end()  # no-op once finished; else the client left
        if result is None:
            log.info("%s: client disconnected; aborted", shaper.request_id)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(result)

    # The handlers return ready Response objects (sent as they are): the models document them.
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=GENERATION_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await complete(request, body, ChatShaper, "chatcmpl-")

    @app.post("/v1/completions", response_model=Completion, responses=GENERATION_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await complete(request, body, CompletionShaper, "cmpl-")

    add_responses_route(app, complete, GENERATION_ERRORS)  # POST /v1/responses (responses_api.py)

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
    async def models() -> dict[str, Any]:
        card = {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "kvmesh",
            "root": str(served.path),
            "max_model_len": served.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        reply = await generator.encode(f"tokenize-{uuid.uuid4().hex}", body.prompt_input())
        return {
            "tokens": reply.token_ids,
            "count": len(reply.token_ids),
            "max_model_len": served.max_model_len,
        }

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        refuse_unhonoured(body.model_extra)
        return {"prompt": await generator.detokenize(body.tokens)}

    @app.get("/version", response_model=VersionResponse, responses=errors(401))
    async def version() -> dict[str, str]:
        return {"version": kvmesh.__version__}

    @app.get("/health", response_model=HealthResponse, responses=errors(503))
    async def health() -> Response:
        if bus.nc.is_connected:
            return JSONResponse({"status": "ok"})
        return _error_response(GatewayError.unavailable("not connected to NATS"))

    @app.get("/ready", response_model=None)
    async def ready() -> Response:
        """200 when a worker can take requests (readiness), unlike /health (liveness): readiness.py."""
        await readiness.start()
        if reason := readiness.reason_not_ready():
            return _error_response(GatewayError.unavailable(reason, "not_ready"))
        return JSONResponse({"status": "ready", "workers": readiness.serving_workers()})

    return app


GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
TENANT_HEADER = "x-tenant-id"  # flow control's fairness key when the body has no `user`
PRIORITY_HEADER = "x-request-priority"  # its band when the body has no `priority` (lower goes first)
CACHE_SALT_HEADER = "x-cache-salt"  # the prefix-cache namespace when the body has no `cache_salt`


def flow_keys(
    prompt_params: tuple[PromptInput, GenerationParams], body: Any, request: Request
) -> tuple[PromptInput, GenerationParams]:
    """The request's priority band, tenant and cache salt: the body's fields, else the headers."""
    prompt, params = prompt_params
    changes: dict[str, Any] = {}
    if body.priority is None and (value := request.headers.get(PRIORITY_HEADER)) is not None:
        try:
            changes["priority"] = int(value)
        except ValueError:
            raise GatewayError.invalid(f"{PRIORITY_HEADER} must be an integer, got {value!r}") from None
    if not body.user and (tenant := request.headers.get(TENANT_HEADER)):
        changes["tenant"] = tenant
    if body.cache_salt is None and (salt := request.headers.get(CACHE_SALT_HEADER)):
        changes["cache_salt"] = salt
    return prompt, dataclasses.replace(params, **changes) if changes else params


def _error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves in OpenAI's error shape; FastAPI's 422s become 400s; no stack traces."""

    @app.exception_handler(GatewayError)
    async def on_gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s: %d %s", _request.method, _request.url.path, exc.status, exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(GatewayError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", _request.method, _request.url.path)
        return _error_response(GatewayError.internal(f"internal error: {type(exc).__name__}"))


def validation_error(errors: list[dict[str, Any]]) -> GatewayError:
    """pydantic's errors as one 400: `param` is the top-level body field of the first error."""
    param = None
    messages = []
    for err in errors[:3]:
        loc = [str(part) for part in err.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        if err.get("type") == "json_invalid":
            loc = []  # its location is a character offset, not a field
        if param is None and loc:
            param = loc[0]
        messages.append(f"{'.'.join(loc) or 'request body'}: {err.get('msg', 'invalid')}")
    return GatewayError.invalid("; ".join(messages) or "invalid request", param)
