"""Tool calling: `tools` / `tool_choice` / `parallel_tool_calls` -> a plan, and the model's output ->
OpenAI's `tool_calls` (whole responses and streamed deltas).

| tool_choice | the prompt | the output | parsed by |
|---|---|---|---|
| `none` | no tools | free text | - (content) |
| `auto` (default with tools) | tools in the template | free text | `--tool-call-parser` (tool_parsers.py) |
| `required` | tools | a JSON array of {"name", "parameters"}, forced by the grammar | JSON |
| named function | tools | that function's arguments, forced by its parameters' schema | JSON |

`required` and named calls go through the same guided decoding as `response_format` (one grammar
per request), so even the 135M default model produces calls whose arguments validate against the
function's schema. A response with calls has `finish_reason: "tool_calls"` (when the model ended it;
`length` stays `length`). Streaming follows OpenAI's deltas: a call's first delta carries its index,
id, type and name with empty arguments, the next ones pieces of the arguments. A named call's
arguments stream token by token; `required` and `auto` calls are sent as each whole completion is
known to hold them (text before an `auto` call streams as content at once), so a malformed call can
still go out as content rather than as a broken call.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmesh.schemas.messages import GuidedSpec
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.params import OutputLogprob, ToolPlan, Usage
from kvmesh.services.gateway.responses import ChatShaper, _dumps
from kvmesh.services.gateway.structured import schema_spec
from kvmesh.services.gateway.tool_parsers import ParsedCall, ParsedOutput, ToolParser


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Part):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Part):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Part):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Part):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolFields(BaseModel):
    """The tool-calling fields of a chat body."""

    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self) -> ToolPlan | None:
        """None: no tools (or tool_choice none): plain chat."""
        choice = self.tool_choice
        if not self.tools:
            if choice is not None and choice != "none":
                raise GatewayError.invalid("tool_choice needs tools", "tool_choice")
            return None
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise GatewayError.invalid("tools: function names must be unique", "tools")
        if choice == "none":
            return None
        template_tools = json.dumps([t.model_dump(exclude_none=True) for t in self.tools], ensure_ascii=False)
        if choice is None or choice == "auto":
            return ToolPlan("auto", template_tools)
        if choice == "required":
            return ToolPlan("required", template_tools, guided=self._required_spec())
        by_name = {t.function.name: t.function for t in self.tools}
        function = by_name.get(choice.function.name)
        if function is None:
            raise GatewayError.invalid(
                f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice"
            )
        return ToolPlan("named", template_tools, function.name, schema_spec(_params(function), "tools"))

    def _required_spec(self) -> GuidedSpec:
        """vLLM's shape for `required`: an array of {"name": <one of the tools>, "parameters": <its
        schema>}, at least one (exactly one unless parallel_tool_calls)."""
        choices = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": _params(t.function),
                },
                "required": ["name", "parameters"],
            }
            for t in self.tools or ()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": choices}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema_spec(schema, "tools")


def _params(function: FunctionDefinition) -> dict[str, Any]:
    return function.parameters or {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_whole(plan: ToolPlan, parser: ToolParser, text: str) -> ParsedOutput:
    """A finished completion's content and calls under the plan."""
    if plan.mode == "named":
        assert plan.forced is not None
        return ParsedOutput(None, [ParsedCall(plan.forced, text)])
    if plan.mode == "required":
        calls = [
            ParsedCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
            for item in array_items(text)
            if isinstance(item, dict) and isinstance(item.get("parameters"), dict) and "name" in item
        ]
        return ParsedOutput(None, calls) if calls else ParsedOutput(text, [])
    return parser.extract(text)


def array_items(text: str) -> list[Any]:
    """The complete elements of a JSON array, also of one cut short by max_tokens (a small model
    asked for `required` calls may go on repeating calls until its budget ends)."""
    body = text.lstrip()
    if not body.startswith("["):
        return []
    decoder = json.JSONDecoder()
    items: list[Any] = []
    pos = 1
    while True:
        while pos < len(body) and body[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(body) or body[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return items
        items.append(item)


class ToolChatShaper(ChatShaper):
    """ChatShaper for a request with tools: the same chunks, plus tool calls parsed from the text."""

    def __init__(self, base: ChatShaper, plan: ToolPlan, parser: ToolParser) -> None:
        super().__init__(base.request_id, base.model, base.created, base.texts, base.include_usage)
        self.plan = plan
        self.parser = parser
        self._text = ""  # everything the model wrote
        self._streamed = 0  # characters of it sent as content (auto) or as arguments (named)
        self._calls_from: int | None = None  # auto: where the calls begin in _text
        self._num_calls = 0

    # -- streaming ----------------------------------------------------------------------------------
    def delta(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        self._text += text
        if self.plan.mode == "named":
            out = b""
            if self._num_calls == 0:
                out = self._call_start(0, new_call_id(), self.plan.forced or "")
                self._num_calls = 1
            return out + (self._args(0, text) if text else b"")
        if self.plan.mode == "required":
            return b""  # sent whole at the end: only then is the array known to parse
        # auto: content up to where the calls begin (or might: a marker's prefix is held back)
        if self._calls_from is None:
            self._calls_from = self.parser.start_of_calls(self._text)
        end = self._calls_from if self._calls_from is not None else len(self._text)
        if self._calls_from is None:
            end -= self.parser.held_back(self._text)
        if end <= self._streamed:
            return b""
        piece, self._streamed = self._text[self._streamed : end], end
        return super().delta(piece, logprobs)

    def finish(self, reason: str) -> bytes:
        out = b""
        calls: list[ParsedCall] = []
        if self.plan.mode == "named":
            calls = [ParsedCall(self.plan.forced or "", self._text)]
            if self._num_calls == 0:  # no token at all
                out += self._call_start(0, new_call_id(), self.plan.forced or "")
        else:
            rest = self._text[self._streamed :]
            parsed = parse_whole(self.plan, self.parser, rest)
            if parsed.content:
                out += super().delta(parsed.content, None)
            for i, call in enumerate(parsed.calls):
                out += self._call_start(i, new_call_id(), call.name) + self._args(i, call.arguments)
            calls = parsed.calls
        return out + super().finish(_finish_reason(reason, calls))

    def _call_start(self, index: int, call_id: str, name: str) -> bytes:
        call = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return self._tool_chunk(call)

    def _args(self, index: int, piece: str) -> bytes:
        return self._tool_chunk({"index": index, "function": {"arguments": piece}})

    def _tool_chunk(self, call: dict[str, Any]) -> bytes:
        delta = _dumps({"tool_calls": [call]})
        return self._chunk('{"index":0,"delta":' + delta + ',"logprobs":null,"finish_reason":null}')

    # -- whole responses ----------------------------------------------------------------------------
    def response(
        self, text: str, logprobs: list[OutputLogprob] | None, reason: str, usage: Usage
    ) -> dict[str, Any]:
        parsed = parse_whole(self.plan, self.parser, text)
        body = super().response(parsed.content or "", logprobs, _finish_reason(reason, parsed.calls), usage)
        if parsed.calls:
            message = body["choices"][0]["message"]
            message["content"] = parsed.content
            message["tool_calls"] = [
                {
                    "id": new_call_id(),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in parsed.calls
            ]
        return body


def _finish_reason(reason: str, calls: list[ParsedCall]) -> str:
    return "tool_calls" if calls and reason == "stop" else reason
