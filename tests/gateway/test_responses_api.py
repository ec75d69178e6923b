"""The Responses API without a mesh: bodies -> chat prompts, refusals naming their field, and the
answer's shapes held to the official `openai` package's own models (whole responses and each streamed
event, parsed as the client parses them)."""

from __future__ import annotations

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.params import Usage
from kvmesh.services.gateway.responses_api import ResponsesRequest, ResponsesShaper

EVENTS = TypeAdapter(ResponseStreamEvent)
USAGE = Usage(prompt_tokens=9, completion_tokens=3, cached_tokens=4)


def _shaper() -> ResponsesShaper:
    echoed = ResponsesRequest(input="hi", max_output_tokens=3, instructions="Be brief.").echoed()
    return ResponsesShaper("resp_1", "m", 1700000000, None, True, echoed)


@pytest.mark.parametrize(("reason", "status"), [("stop", "completed"), ("length", "incomplete")])
def test_whole_response_is_the_clients_response_object(reason, status):
    body = _shaper().response("Hello there", None, reason, USAGE)
    r = Response.model_validate(body)
    assert (r.id, r.object, r.status, r.model, r.output_text) == (
        "resp_1",
        "response",
        status,
        "m",
        "Hello there",
    )
    message = r.output[0]
    assert (message.type, message.role, message.status) == ("message", "assistant", status)
    assert message.id.startswith("msg_") and message.content[0].annotations == []
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (9, 3, 12)
    assert r.usage.input_tokens_details.cached_tokens == 4
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    if reason == "stop":
        assert r.incomplete_details is None
    else:
        assert r.incomplete_details.reason == "max_output_tokens"
    assert (r.instructions, r.max_output_tokens) == ("Be brief.", 3)


def _events(raw: bytes) -> list:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        event = EVENTS.validate_json(data_line.removeprefix("data: "))
        assert name_line == f"event: {event.type}"
        events.append(event)
    return events


@pytest.mark.parametrize(
    ("reason", "last"), [("stop", "response.completed"), ("length", "response.incomplete")]
)
def test_stream_events_parse_in_order_with_sequence_numbers(reason, last):
    shaper = _shaper()
    pieces = ["Hel", "lo", " there", ""]
    raw = shaper.opening() + b"".join(shaper.delta(p, None) for p in pieces)
    raw += shaper.finish(reason) + shaper.usage(USAGE) + shaper.done()
    events = _events(raw)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there"
    item_id = events[2].item.id
    assert {e.item_id for e in events[3:9]} == {item_id} == {events[9].item.id}
    assert events[7].text == events[8].part.text == "Hello there"
    final = events[-1].response
    assert (final.output_text, final.output[0].id, final.usage.total_tokens) == ("Hello there", item_id, 12)


def test_an_error_mid_stream_is_the_clients_error_event():
    shaper = _shaper()
    raw = shaper.opening() + shaper.error_event(GatewayError.timeout("no token for 120 s", "token_timeout"))
    error = _events(raw)[-1]
    assert (error.type, error.code, error.sequence_number) == ("error", "token_timeout", 4)


def test_input_and_instructions_become_chat_messages():
    body = ResponsesRequest.model_validate(
        {
            "instructions": "Answer in French.",
            "input": [
                {"role": "user", "content": "Hi"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Salut"}],
                },
                {
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                },
            ],
            "max_output_tokens": 7,
            "temperature": 0,
            "store": False,
        }
    )
    prompt, params = body.prompt_and_params()
    assert [(m.role, m.content) for m in prompt.messages] == [
        ("system", "Answer in French."),
        ("user", "Hi"),
        ("assistant", "Salut"),
        ("system", "a\nb"),
    ]
    assert (params.max_tokens, params.temperature, params.prompt_param) == (7, 0.0, "input")
    prompt, params = ResponsesRequest(input="Hi").prompt_and_params()
    assert [(m.role, m.content) for m in prompt.messages] == [("user", "Hi")]
    assert (params.max_tokens, params.temperature, params.top_p) == (None, 1.0, 1.0)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id", "unsupported_field"),
        ({"input": "hi", "store": True}, "store", "unsupported_field"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", "unsupported_field"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning", "unsupported_field"),
        ({"input": "hi", "max_output_tokenz": 5}, "max_output_tokenz", "unknown_field"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input", None),
        ({"input": "hi", "temperature": 3}, "temperature", None),
        ({"input": []}, "input", None),
    ],
)
async def test_refusals_name_the_field(client, body, param, code):
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error")
    if code is not None:
        assert err["code"] == code and param in err["message"]


async def test_unknown_model_is_404(client):
    r = await client.post("/v1/responses", json={"model": "gpt-9", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
