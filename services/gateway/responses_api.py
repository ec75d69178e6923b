"""OpenAI's Responses API, stateless: `POST /v1/responses` as a chat completion with another shape.

The body becomes chat messages (`instructions` a system message first, then `input`: a string is one
user message, a list holds messages whose content is a string or `input_text` / `output_text` parts)
and goes the chat completion's way (app.py's `complete`: admission, flow control, generation, stream,
cancellation). Only the answer's shape differs (`ResponsesShaper`): a `response` object, or the
Responses stream's named events (`event:` and `data:` lines, each with its `sequence_number`, no
`[DONE]`). Nothing is stored: `previous_response_id` is a 400 naming it, and so is `store: true`;
`store` left out means not stored here (OpenAI's default is to store). A length cut is `status:
"incomplete"` with `incomplete_details.reason: "max_output_tokens"`. Fields of the Responses API not
declared here follow request_fields.py's rule (a 400 naming them unless they ask for nothing).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.openai_protocol import INT64, ChatCompletionRequest
from kvmesh.services.gateway.params import GenerationParams, OutputLogprob, PromptInput, Usage
from kvmesh.services.gateway.request_fields import refuse_unhonoured
from kvmesh.services.gateway.responses import StreamShaper, TokenTexts, _dumps

ShaperFactory = Callable[[str, str, int, TokenTexts | None, bool], StreamShaper]
Complete = Callable[[Request, Any, ShaperFactory, str], Awaitable[Response]]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(_Part):
    type: Literal["input_text", "output_text"]  # output_text: an earlier answer sent back as history
    text: str


class InputMessage(_Part):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # undeclared fields: request_fields.refuse_unhonoured
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = None
    store: bool | None = None  # false or left out: nothing is stored either way
    previous_response_id: str | None = None  # refused: there is no stored response to continue
    user: str | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # vLLM's extension
    priority: int | None = Field(None, ge=-(2**31), lt=2**31)  # flow control (vLLM's)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)  # vLLM's

    @property
    def include_usage(self) -> bool:
        return True  # the stream's last event carries the whole response, usage included

    def prompt_and_params(self) -> tuple[PromptInput, GenerationParams]:
        if self.previous_response_id is not None:
            message = (
                "previous_response_id is not supported: responses are not stored; send the conversation "
                "as input"
            )
            raise GatewayError.invalid(message, "previous_response_id", "unsupported_field")
        if self.store:
            message = "store: responses are not stored by this server; leave store out or set it to false"
            raise GatewayError.invalid(message, "store", "unsupported_field")
        refuse_unhonoured(self.model_extra)
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [{"role": m.role, "content": m.text()} for m in self.input]
        if not messages:
            raise GatewayError.invalid("input is empty", "input")
        chat = ChatCompletionRequest.model_validate(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": self.max_output_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
                "user": self.user,
                "priority": self.priority,
                "cache_salt": self.cache_salt,
            }
        )
        prompt, params = chat.prompt_and_params()
        return prompt, dataclasses.replace(params, prompt_param="input")

    def echoed(self) -> dict[str, Any]:
        """The request's settings as a Response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "user": self.user,
        }


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponsesShaper(StreamShaper):
    """One response: whole (`response`), or as the Responses stream's events. The answer is one
    output message (`msg_<hex>`) with one `output_text` part."""

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        texts: TokenTexts | None,
        include_usage: bool = True,
        echoed: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(request_id, model, created, texts, True)
        self.echoed = echoed or {}
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self._seq = 0
        self._text: list[str] = []
        self._reason = "stop"
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        self._delta_head = _dumps({"type": "response.output_text.delta", **where, "logprobs": []})[:-1]

    # -- the objects ----------------------------------------------------------------------------------
    def _status(self) -> str:
        return "incomplete" if self._reason == "length" else "completed"

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(self, status: str, output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.request_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "metadata": {},
            **self.echoed,
            "usage": usage_object(usage) if usage is not None else None,
        }

    def response(
        self, text: str, logprobs: list[OutputLogprob] | None, reason: str, usage: Usage
    ) -> dict[str, Any]:
        self._reason = reason
        status = self._status()
        return self._response(status, [self._item(status, [self._part(text)])], usage)

    # -- the stream -----------------------------------------------------------------------------------
    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        data = _dumps({"type": kind, **payload, "sequence_number": self._seq})
        self._seq += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def opening(self) -> bytes:
        started = self._response("in_progress", [], None)
        added = {"output_index": 0, "item": self._item("in_progress", [])}
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return b"".join(
            (
                self._event("response.created", {"response": started}),
                self._event("response.in_progress", {"response": started}),
                self._event("response.output_item.added", added),
                self._event("response.content_part.added", {**where, "part": self._part("")}),
            )
        )

    def delta(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        if not text:
            return b""
        self._text.append(text)
        data = self._delta_head + ',"delta":' + _dumps(text) + ',"sequence_number":' + str(self._seq) + "}"
        self._seq += 1
        return b"event: response.output_text.delta\ndata: " + data.encode() + b"\n\n"

    def finish(self, reason: str) -> bytes:
        self._reason = reason
        text = "".join(self._text)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        item = self._item(self._status(), [self._part(text)])
        return b"".join(
            (
                self._event("response.output_text.done", {**where, "text": text, "logprobs": []}),
                self._event("response.content_part.done", {**where, "part": self._part(text)}),
                self._event("response.output_item.done", {"output_index": 0, "item": item}),
            )
        )

    def usage(self, usage: Usage) -> bytes:
        status = self._status()
        item = self._item(status, [self._part("".join(self._text))])
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return self._event(kind, {"response": self._response(status, [item], usage)})

    def error_event(self, exc: GatewayError) -> bytes:
        error = {"code": exc.code or exc.type, "message": exc.message, "param": exc.param}
        return self._event("error", error)

    def done(self) -> bytes:
        return b""  # the Responses stream has no [DONE]


def add_responses_route(app: FastAPI, complete: Complete, responses: dict[int | str, dict[str, Any]]) -> None:
    """`POST /v1/responses` on the app, through its `complete` (app.py). Left out of /openapi.json for
    now: its stream's named events are not described there yet (see the README)."""

    @app.post("/v1/responses", response_model=None, responses=responses, include_in_schema=False)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        echoed = body.echoed()

        def shaper(request_id: str, model: str, created: int, texts: TokenTexts | None, _usage: bool):
            return ResponsesShaper(request_id, model, created, texts, True, echoed)

        return await complete(request, body, shaper, "resp_")
