"""Tool calling without a mesh: the parsers on recorded completions (fixtures), the chat shaper's
streamed deltas against its whole response, the plans tool_choice makes, and what the chat template
is given (tools, chat_template_kwargs) in the tokenizer service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmesh.schemas.messages import ChatMessage, EncodeReply, EncodeRequest, ErrorReply, ToolCall
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.openai_protocol import ChatCompletionRequest
from kvmesh.services.gateway.params import Usage
from kvmesh.services.gateway.responses import ChatShaper
from kvmesh.services.gateway.tool_parsers import PARSERS, get_parser
from kvmesh.services.gateway.tools import ToolChatShaper, ToolFields, ToolPlan, array_items

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "tool_call_outputs.json").read_text())
CASES = [(parser, case) for parser in PARSERS for case in FIXTURES[parser]]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


@pytest.mark.parametrize(("parser", "case"), CASES, ids=[f"{p}: {c['name']}" for p, c in CASES])
def test_parser_on_recorded_outputs(parser, case):
    parsed = get_parser(parser).extract(case["text"])
    assert parsed.content == case["content"]
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [tuple(c) for c in case["calls"]]


def _shaper(plan: ToolPlan, parser: str) -> ToolChatShaper:
    return ToolChatShaper(ChatShaper("chatcmpl-1", "m", 0, None), plan, get_parser(parser))


def _assemble(chunks: list[bytes]) -> tuple[str | None, list[tuple[str, str, str]], str]:
    """OpenAI's streamed deltas -> (content, [(id, name, arguments)], finish_reason), as a client
    accumulates them: a call's first delta brings id and name, later ones append arguments."""
    content, calls, reason = "", {}, None
    for raw in chunks:
        for line in raw.decode().split("\n\n"):
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                if "id" in call:
                    assert call["index"] not in calls and call["function"]["arguments"] == ""
                    calls[call["index"]] = [call["id"], call["function"]["name"], ""]
                calls[call["index"]][2] += call["function"].get("arguments", "")
            reason = choice["finish_reason"] or reason
    return content or None, [tuple(calls[i]) for i in sorted(calls)], reason


def _stream(shaper: ToolChatShaper, text: str, piece: int) -> list[bytes]:
    chunks = [shaper.opening()]
    chunks += [shaper.delta(text[i : i + piece], None) for i in range(0, len(text), piece)]
    return [*chunks, shaper.finish("stop")]


@pytest.mark.parametrize("piece", [1, 3, 7])
@pytest.mark.parametrize(("parser", "case"), CASES, ids=[f"{p}: {c['name']}" for p, c in CASES])
def test_streamed_deltas_assemble_to_the_whole_response(parser, case, piece):
    plan = ToolPlan("auto", "[]")
    content, calls, reason = _assemble(_stream(_shaper(plan, parser), case["text"], piece))
    whole = _shaper(plan, parser).response(case["text"], None, "stop", Usage(1, 1, 0))
    message = whole["choices"][0]
    want_calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in message["message"].get("tool_calls", [])
    ]
    assert [(name, args) for _id, name, args in calls] == want_calls
    assert all(call_id.startswith("call_") for call_id, _, _ in calls)
    assert (content or "").strip() == (message["message"]["content"] or "").strip()
    assert reason == message["finish_reason"] == ("tool_calls" if case["calls"] else "stop")


def test_named_call_streams_its_arguments_token_by_token():
    plan = ToolPlan("named", "[]", forced="get_weather")
    chunks = _stream(_shaper(plan, "hermes"), '{"city": "Paris"}', 2)
    content, calls, reason = _assemble(chunks)
    assert content is None and reason == "tool_calls"
    assert [(name, args) for _, name, args in calls] == [("get_weather", '{"city": "Paris"}')]
    assert len(chunks) > 5  # id + name first, then the arguments in pieces


def test_required_calls_from_an_array_cut_short():
    text = '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}, {"na'
    assert [item["name"] for item in array_items(text)] == ["now", "get_weather"]
    whole = _shaper(ToolPlan("required", "[]"), "hermes").response(text, None, "length", Usage(1, 1, 0))
    choice = whole["choices"][0]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["now", "get_weather"]
    assert choice["finish_reason"] == "length"


def _plan(**body) -> ToolPlan | None:
    return ToolFields.model_validate(body).tool_plan()


def test_tool_choice_plans():
    assert _plan(tools=TOOLS, tool_choice="none") is None
    assert _plan(tools=TOOLS).mode == "auto"
    named = _plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and json.loads(named.guided.value)["required"] == ["city"]
    required = json.loads(_plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).guided.value)
    assert required["minItems"] == required["maxItems"] == 1
    assert [c["properties"]["name"]["enum"] for c in required["items"]["anyOf"]] == [["get_weather"], ["now"]]
    for body, field in [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ]:
        with pytest.raises(GatewayError) as err:
            _plan(**body)
        assert err.value.status == 400 and err.value.param == field


def test_guided_sources_conflict_and_legacy_functions_are_refused():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    for extra, field in [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_choice": ["a"]}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ]:
        with pytest.raises(GatewayError) as err:
            ChatCompletionRequest.model_validate(base | extra).prompt_and_params()
        assert err.value.status == 400 and err.value.param == field, err.value.message


@pytest.fixture(scope="module")
def tokenizer_service(default_model_path):
    from kvmesh.services.tokenizer.service import TokenizerConfig, TokenizerService

    return TokenizerService(TokenizerConfig("nats://unused", str(default_model_path)), default_model_path)


def _render(service, req: EncodeRequest) -> str:
    reply = service.encode(req)
    assert isinstance(reply, EncodeReply), reply
    return service.fast.decode(reply.token_ids, skip_special_tokens=False)


def test_chat_template_gets_tools_history_and_kwargs(tokenizer_service, monkeypatch):
    # A template written for tools (the shape of Qwen's / Hermes'): tools, calls, tool results, a kwarg.
    template = (
        "{% if tools %}TOOLS={{ tools | map(attribute='function.name') | join(',') }};{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }};"
        "{% endfor %}"
        "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}{% endfor %}"
        "{% if enable_thinking is defined %}THINK={{ enable_thinking }}{% endif %}"
    )
    monkeypatch.setattr(tokenizer_service.hf, "chat_template", template)
    history = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')],
        ),
        ChatMessage(role="tool", content="18C", tool_call_id="call_1", name="get_weather"),
    ]
    req = EncodeRequest(
        request_id="r",
        messages=history,
        tools=json.dumps(TOOLS),
        chat_template_kwargs=json.dumps({"enable_thinking": False}),
    )
    assert _render(tokenizer_service, req) == (
        "TOOLS=get_weather,now;[user]Weather in Paris?[assistant]CALL get_weather Paris;"
        "[tool]18C(for call_1)THINK=False"
    )
    bad = EncodeRequest(request_id="r", messages=history, chat_template_kwargs='{"tokenize": true}')
    reply = tokenizer_service.encode(bad)
    assert isinstance(reply, ErrorReply) and reply.field == "chat_template_kwargs"


def test_template_without_tools_gets_them_in_the_system_message(tokenizer_service):
    # The default model's template has no tools section: the Hermes system prompt carries them.
    assert "tools" not in (tokenizer_service.hf.chat_template or "")
    history = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="c", name="now", arguments="{}")]),
    ]
    text = _render(
        tokenizer_service, EncodeRequest(request_id="r", messages=history, tools=json.dumps(TOOLS))
    )
    assert text.startswith("<|im_start|>system\nYou are a function calling AI model.")
    assert '"name": "get_weather"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>' in text


def test_a_migrated_request_keeps_its_grammar_and_counts_its_output_as_resumed():
    from kvmesh.schemas.messages import GenerateRequest, GuidedSpec, RouteRequest, SamplingOptions
    from kvmesh.services.gateway.dispatch import Submission
    from kvmesh.services.gateway.stream import resume

    guided = GuidedSpec(kind="json_schema", value='{"type":"object"}')
    gen = GenerateRequest(
        request_id="r",
        token_ids=[1, 2, 3],
        sampling=SamplingOptions(max_tokens=10, guided=guided),
        stream_subject="s",
    )
    moved = resume(
        Submission(RouteRequest(request_id="r", num_tokens=3, max_tokens=10), gen), [7, 8], ["w0"], 1
    )
    # the worker advances the grammar over the resumed tokens (tests/engine/test_guided.py)
    assert moved.generate.sampling.guided == guided and moved.generate.sampling.resumed_tokens == 2
    assert moved.generate.token_ids == [1, 2, 3, 7, 8]
