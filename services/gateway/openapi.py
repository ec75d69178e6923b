"""What the gateway answers, as pydantic models for its OpenAPI schema: whole completions, the SSE
stream's events, OpenAI's error object, and which statuses each route can return.

The handlers keep writing their bodies themselves (responses.py renders the stream chunk by chunk and
returns ready Response objects, which FastAPI sends as they are): these models describe the wire,
they are not on its path. The fuzz test (tests/reliability/test_fuzz_openapi.py) holds every
response to them, so a body or status that drifts from its description fails there.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

# libs/engine/request.py FinishReason; tool_calls: the answer holds tool calls (tools.py)
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object (errors.py GatewayError.body)."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None: only tool calls
    tool_calls: list[ToolCallOut] | None = None  # requests with tools (tools.py)
    reasoning_content: str | None = None  # with --reasoning-parser: the think section (reasoning.py)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # a piece of the JSON text


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None  # in a call's first delta
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # with --reasoning-parser: a piece of the think section
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a chat stream; the usage event (stream_options.include_usage) has no
    choices and the usage, the others `"usage": null` when usage was asked for, no usage otherwise."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One `data:` event of a completion stream (usage as in ChatCompletionChunk)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class VersionResponse(BaseModel):
    version: str  # kvmesh's package version


_ERRORS = {
    400: "Invalid request (FastAPI's validation errors too: they are answered as 400, never 422)",
    401: "Missing or wrong API key (when the gateway has keys)",
    404: "Unknown model",
    413: "Request body over the gateway's limit",
    429: "Over capacity (the gateway's in-flight bound, or every worker's queue); see Retry-After",
    500: "Internal error",
    503: "A service the request needs is unavailable; see Retry-After",
    504: "A timeout (request, first token, or between tokens)",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: these error statuses, each with OpenAI's error object."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}


GENERATION_ERRORS = errors(400, 401, 404, 413, 429, 500, 503, 504)
TOKENIZER_ERRORS = errors(400, 401, 404, 413, 429, 500, 503, 504)

_STREAMS = {  # route -> the model of its stream's events
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": CompletionChunk,
}


def _stream_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream (before OpenAPI 3.2 a text/event-stream schema describes each
    event): its data is a chunk, an error that ended the stream after the 200, or the final [DONE]."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": _ERROR_REF}]}
    data = {
        "anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json", "contentSchema": payload}]
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"const": "message"}},
    }


_ERROR_REF = "#/components/schemas/ErrorResponse"


def install_openapi(app: FastAPI) -> None:
    """The app's /openapi.json: FastAPI's, with the streams added as text/event-stream responses and
    its 422s removed (the gateway answers validation errors with 400)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                operation.get("responses", {}).pop("422", None)
        _, defs = models_json_schema(
            [(m, "serialization") for m in _STREAMS.values()], ref_template="#/components/schemas/{model}"
        )
        components.update(defs.get("$defs", {}))
        for path, chunk in _STREAMS.items():
            content = schema["paths"][path]["post"]["responses"]["200"]["content"]
            content["text/event-stream"] = {"schema": _stream_event(chunk)}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
